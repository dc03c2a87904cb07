"""Small state files written so that a kill at any moment leaves the old contents or the new.

The text goes to a hidden temporary file beside the target, is flushed to the disk, and is then
renamed over the target: a rename within one folder is atomic, so a reader (or the next start
after a `kill -9` or a power cut) finds either the whole old file or the whole new one, never a
torn one. Every piece of state ladle keeps as a file goes through here: registered local models,
the running service's record, the cache's completion markers. Sessions live in SQLite, whose
transactions give the same guarantee.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Replace `path` with `text` (UTF-8) in one step; `mode` 0o600 for a file holding a secret.

    The temporary file is created with `mode` from the start, so a secret is never readable by
    others, not even for the moment before the rename.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush the rename itself (the folder's entry) to the disk, where the system allows it."""
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
