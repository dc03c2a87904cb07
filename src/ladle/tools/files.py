"""Files that tools produce, kept by id (`file-...`) for `find_file` and `GET /v1/files/{id}`.

A tool's image, resource or long text does not belong in the model's context: the model sees
a short note (`describe`) or the head of a long text (`preview`), and the client fetches the
whole body by id. A file made during a session belongs to it and goes when it goes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ladle.tools.callbacks import ToolFile
from ladle.tools.database import Database

PREVIEW_CHARS = 1000  # of a long tool text, what the model reads; the rest is kept as a file
LONG_TEXT_CHARS = 4000  # a tool text longer than this is stored as a file


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file in the store, its body included (`find_file` returns the whole of it)."""

    id: str
    name: str
    media_type: str
    data: bytes
    created_at: int
    session_id: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def describe(self) -> str:
        """What the model reads in place of the body."""
        return f"[file {self.id}: {self.name}, {self.media_type}, {self.size} bytes]"


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, file: ToolFile, session_id: str | None = None) -> StoredFile:
        stored = StoredFile(
            f"file-{uuid.uuid4().hex[:24]}",
            file.name,
            file.media_type,
            file.data,
            int(time.time()),
            session_id,
        )
        with self.db.transaction() as conn:
            exists = (
                session_id is not None
                and conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
            )
            conn.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    session_id if exists else None,
                    stored.name,
                    stored.media_type,
                    stored.data,
                    stored.created_at,
                ),
            )
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT id, name, media_type, data, created, session_id FROM files WHERE id = ?",
                (file_id,),
            ).fetchone()
        return None if row is None else _stored(row)


def _stored(row: tuple[Any, ...]) -> StoredFile:
    fid, name, media_type, data, created, session_id = row
    return StoredFile(fid, name, media_type, bytes(data), int(created), session_id)


def preview(text: str) -> tuple[str, bool]:
    """The text the model reads of a tool's text result, and whether it was cut."""
    if len(text) <= LONG_TEXT_CHARS:
        return text, False
    return text[:PREVIEW_CHARS], True
