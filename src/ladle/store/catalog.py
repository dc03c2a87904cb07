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
import re
from collections.abc import Collection, Iterable, Sequence
from importlib import resources
from pathlib import Path

from filelock import FileLock

from ladle import envconfig
from ladle.devices import runnable_device_types
from ladle.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from ladle.store.atomic import write_atomic
from ladle.store.cache import ModelCache
from ladle.store.download import download_model
from ladle.store.entry import LOCAL_PROVIDER, CatalogEntry

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
LOCAL_MODELS_FILE = "local_models.json"
BUILTIN_CATALOG = "catalog_data.json"
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEVICE_RANK = {"GPU": 0, "CPU": 1}  # CUDA before CPU


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
        builtin = resources.files("ladle.store").joinpath(BUILTIN_CATALOG)
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
            write_atomic(file, text + "\n")


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


def _local_entry(alias: str, path: Path, task: str) -> CatalogEntry:
    voice = path.with_name(path.name + ".json")  # a Piper voice's config beside its .onnx
    voices = sorted(path.glob("*.onnx")) if path.is_dir() else []
    if path.is_file() and path.suffix.lower() == ".onnx" and voice.is_file():
        fmt, files, task = "onnx", [path, voice], "text-to-speech"
    elif len(voices) == 1 and voices[0].with_name(voices[0].name + ".json").is_file():
        fmt, task = "onnx", "text-to-speech"
        files = [voices[0], voices[0].with_name(voices[0].name + ".json")]
    elif path.is_dir() and any(path.glob("model.bin*")) and (path / "config.json").is_file():
        fmt, task = "ctranslate2", "automatic-speech-recognition"  # Whisper, as faster-whisper
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file() and path.suffix.lower() == ".gguf":
        fmt, files = "gguf", [path]
    elif path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        fmt, files = "safetensors", sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        fmt, files = "gguf", ggufs
    elif not path.exists():
        raise ModelNotFoundError(str(path), "no such file or folder")
    else:
        raise ModelLoadError(
            path,
            "not a .gguf file, a folder with config.json and safetensors, or one .gguf, a Piper "
            "voice (.onnx with its .onnx.json) or a CTranslate2 Whisper folder (model.bin)",
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
