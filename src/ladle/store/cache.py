"""The on-disk model cache: one folder per model id, which counts only once it is marked complete.

    <root>/<id made safe>/<files>             e.g. smollm2-135m-instruct-q4_1-generic-cpu--1/
    <root>/<id made safe>/.ladle-entry.json   the completion marker: the id and its files
    <root>/.locks/<id made safe>.lock         held while an entry is written or removed

The marker is written last, after every file is in place and verified, so a folder without one
is a download in progress or an interrupted one: never listed, never loaded, resumed by the next
download. Registered local models are not in the cache: their files stay where the user keeps
them.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ladle import envconfig
from ladle.store.atomic import write_atomic
from ladle.store.entry import CatalogEntry, CatalogFile
from ladle.store.transfer import file_uri_path

MARKER = ".ladle-entry.json"
LOCKS_DIR = ".locks"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class CachedModel:
    """A complete model in the cache: its id, folder and bytes on disk."""

    id: str
    path: Path
    size_bytes: int


class ModelCache:
    """The model cache under `root` (default `LADLE_CACHE_DIR`, else `~/.ladle/models`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else envconfig.cache_dir()

    def entry_dir(self, entry_or_id: CatalogEntry | str) -> Path:
        """The folder of one model id (its name is the id with `:` as `--`, other oddities `_`)."""
        return self.root / _dir_name(_id_of(entry_or_id))

    def lock(self, entry_or_id: CatalogEntry | str) -> FileLock:
        """The lock that serializes writing and removing one entry, across threads and processes.

        It lives outside the entry's folder, so removing the folder never unlinks a held lock.
        """
        locks = self.root / LOCKS_DIR
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / f"{_dir_name(_id_of(entry_or_id))}.lock")

    def is_cached(self, entry: CatalogEntry) -> bool:
        """Whether the model is ready to load: marked complete, every file there at its size."""
        if entry.local_path is not None:
            return entry.local_path.exists()
        marker = _read_marker(self.entry_dir(entry))
        if marker is None or marker.get("id") != entry.id:
            return False
        return all(_has_size(self.file_path(entry, f), f.size) for f in entry.files)

    def model_path(self, entry: CatalogEntry) -> Path:
        """What to hand to `TextModelBuilder`: the GGUF file, or the model folder."""
        if entry.local_path is not None:
            return entry.local_path
        folder = self.entry_dir(entry)
        return folder / entry.entry_file if entry.entry_file else folder

    def file_path(self, entry: CatalogEntry, file: CatalogFile) -> Path:
        """Where one file of the model lives (a local model's files are where the user has them)."""
        if entry.local_path is not None:
            return file_uri_path(file.source)
        return self.entry_dir(entry) / file.name

    def mark_complete(self, entry: CatalogEntry) -> None:
        """Write the completion marker; call only once every file is in place and verified."""
        marker = {
            "id": entry.id,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in entry.files],
        }
        write_atomic(self.entry_dir(entry) / MARKER, json.dumps(marker, indent=2) + "\n")

    def list(self) -> list[CachedModel]:
        """The complete models in the cache, by id."""
        found = []
        folders = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for folder in folders:
            marker = _read_marker(folder) if folder.is_dir() else None
            if marker is not None and isinstance(marker.get("id"), str):
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                found.append(CachedModel(marker["id"], folder, size))
        return sorted(found, key=lambda m: m.id)

    def cached_ids(self) -> set[str]:
        """The ids of the complete models, for `Catalog.find(..., cached_ids=...)`."""
        return {m.id for m in self.list()}

    def remove(self, model_id: str) -> bool:
        """Delete a model's folder, complete or not; False if there was none.

        Waits for a download of the same model to finish first. The folder is always one
        inside the cache root (the id is made safe); if it is a symbolic link, the link goes,
        never what it points to.
        """
        folder = self.entry_dir(model_id)
        with self.lock(model_id):
            if folder.is_symlink():
                folder.unlink()
                return True
            if not folder.is_dir():
                return False
            shutil.rmtree(folder)
        return True

    def verify(self, entry: CatalogEntry) -> builtins.list[str]:
        """What is wrong with the cached files (missing, wrong size, sha256 mismatch); [] if none.

        Reads every file whose sha256 the catalog knows, so it takes a while on a large model.
        """
        problems = []
        if entry.local_path is None and _read_marker(self.entry_dir(entry)) is None:
            problems.append(f"{entry.id}: not completely downloaded")
        for file in entry.files:
            path = self.file_path(entry, file)
            if not path.is_file():
                problems.append(f"{file.name}: missing")
            elif file.size is not None and (size := path.stat().st_size) != file.size:
                problems.append(f"{file.name}: {size} bytes, expected {file.size}")
            elif file.sha256 is not None and (digest := sha256_of(path)) != file.sha256:
                problems.append(f"{file.name}: sha256 {digest}, expected {file.sha256}")
        return problems


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _id_of(entry_or_id: CatalogEntry | str) -> str:
    return entry_or_id if isinstance(entry_or_id, str) else entry_or_id.id


def _dir_name(model_id: str) -> str:
    safe = _UNSAFE.sub("_", model_id.replace(":", "--"))
    if safe.startswith("."):  # never a hidden folder, nor "." / ".." / the locks folder
        safe = "_" + safe[1:]
    return safe or "_"


def _has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no marker, or one cut short: the entry is not complete
    return marker if isinstance(marker, dict) else None
