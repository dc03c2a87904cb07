"""Sessions: a conversation's whole history kept under an id, so a client sends only its new turn.

A session holds the messages as the chat template reads them (user, assistant with its tool
calls, tool results) and owns the files its tools made. mistral.rs keeps 128 sessions in
memory for 30 minutes; here the same store runs in memory for the SDK and in SQLite under the
ladle home for `ladle serve` (restarts keep them), within limits that are settings.

A request on a session holds the session's lock from reading its history to storing its
reply: two requests on one session run one after the other, and neither loses the other's
turn. Every change is one SQLite transaction; a malformed import changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ladle.errors import InvalidRequestError, NotFoundError
from ladle.protocol.openai import SESSION_ID_PATTERN, ChatMessage
from ladle.tools.database import Database

SESSION_ID = re.compile(SESSION_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What the store keeps. Past `max_sessions` or `max_bytes` (messages and files of all
    sessions), the least recently used sessions go first; one idle longer than
    `idle_ttl_secs` (None: forever) is gone at the next change."""

    max_sessions: int = 128
    idle_ttl_secs: float | None = 1800.0
    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise InvalidRequestError("must be at least 1", param="max_sessions")
        if self.idle_ttl_secs is not None and self.idle_ttl_secs <= 0:
            raise InvalidRequestError("must be positive", param="idle_ttl_secs")
        if self.max_bytes < 1:
            raise InvalidRequestError("must be at least 1", param="max_bytes")


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    messages: list[dict[str, Any]]
    created_at: float
    updated_at: float


def check_session_id(session_id: str, param: str = "session_id") -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise InvalidRequestError(
            "a session id is 1-128 letters, digits, '.', '_', ':' or '-', starting with a "
            f"letter or digit; got {session_id!r}",
            param=param,
        )
    return session_id


def turns(messages: list[dict[str, Any]], num_turns: int) -> list[dict[str, Any]]:
    """The first `num_turns` turns: a turn starts at a user message and runs to the next
    one (the assistant's reply, its tool calls and their results); what comes before the
    first user message (the system prompt) is kept."""
    seen = 0
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            if seen == num_turns:
                return messages[:i]
            seen += 1
    return list(messages)


class SessionStore:
    def __init__(self, db: Database, limits: SessionLimits | None = None) -> None:
        self.db = db
        self.limits = limits or SessionLimits()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def lock(self, session_id: str) -> threading.Lock:
        """The lock a request holds on this session from reading it to storing its reply."""
        with self._locks_guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def ids(self) -> list[str]:
        """Live sessions, most recently used first."""
        with self.db.transaction() as conn:
            self._expire(conn)
            rows = conn.execute("SELECT id FROM sessions ORDER BY updated DESC, id").fetchall()
        return [r[0] for r in rows]

    def get(self, session_id: str) -> Session | None:
        with self.db.transaction() as conn:
            self._expire(conn)
            row = conn.execute(
                "SELECT messages, created, updated FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return None if row is None else Session(session_id, json.loads(row[0]), row[1], row[2])

    def require(self, session_id: str) -> Session:
        session = self.get(session_id)
        if session is None:
            raise NotFoundError("session", session_id)
        return session

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The stored messages ([] for a session not yet made)."""
        session = self.get(check_session_id(session_id))
        return [] if session is None else session.messages

    def append(self, session_id: str, messages: list[dict[str, Any]]) -> None:
        """Add messages at the end, making the session if it is new."""
        check_session_id(session_id)
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT messages, created FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            old, created = (json.loads(row[0]), row[1]) if row else ([], time.time())
            self._write(conn, session_id, old + messages, created)

    def delete(self, session_id: str) -> None:
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
        if not gone:
            raise NotFoundError("session", session_id)

    def fork(self, source: str, dest: str, num_turns: int | None = None) -> None:
        """Copy `source`'s first `num_turns` turns (all: None) into a new session `dest`.
        Files stay with `source`: the copied messages refer to them by id."""
        check_session_id(dest, "dest")
        if num_turns is not None and num_turns < 0:
            raise InvalidRequestError("must be >= 0", param="num_turns")
        messages = self.require(source).messages
        if num_turns is not None:
            messages = turns(messages, num_turns)
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (dest,)).fetchone():
                raise InvalidRequestError(f"session {dest!r} already exists", param="dest")
            self._write(conn, dest, messages, time.time())

    def export(self, session_id: str) -> dict[str, Any]:
        """The session as JSON data that `import_` takes back, here or in another process:
        its messages and its files' bodies (base64)."""
        session = self.require(session_id)
        with self.db.transaction() as conn:
            files = conn.execute(
                "SELECT id, name, media_type, data, created FROM files WHERE session_id = ? "
                "ORDER BY created, rowid",
                (session_id,),
            ).fetchall()
        return {
            "object": "session",
            "id": session.id,
            "created_at": int(session.created_at),
            "updated_at": int(session.updated_at),
            "messages": session.messages,
            "files": [
                {
                    "id": f[0],
                    "filename": f[1],
                    "media_type": f[2],
                    "data": base64.b64encode(f[3]).decode(),
                    "created_at": int(f[4]),
                }
                for f in files
            ],
        }

    def import_(self, data: str | bytes | dict[str, Any], session_id: str | None = None) -> str:
        """Store an exported session (JSON text or its dict), replacing one with the same id;
        `session_id` overrides the id in the data. Checked whole before anything is written."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise InvalidRequestError(f"not JSON: {e}", param="session") from e
        if not isinstance(data, dict):
            raise InvalidRequestError("must be a JSON object", param="session")
        sid = check_session_id(session_id or data.get("id"), "id")  # type: ignore[arg-type]
        messages = _checked_messages(data.get("messages"))
        files = _checked_files(data.get("files", []))
        created = data.get("created_at", time.time())
        if not isinstance(created, (int, float)):
            raise InvalidRequestError("must be a number", param="created_at")
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            conn.executemany("DELETE FROM files WHERE id = ?", [(f[0],) for f in files])
            self._write(conn, sid, messages, float(created))
            conn.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                [(f[0], sid, f[1], f[2], f[3], f[4]) for f in files],
            )
        return sid

    def _write(self, conn: Any, sid: str, messages: list[dict[str, Any]], created: float) -> None:
        text = json.dumps(messages, ensure_ascii=False)
        if len(text) > self.limits.max_bytes:
            raise InvalidRequestError(
                f"session {sid!r} would hold {len(text)} bytes, over the store's limit of "
                f"{self.limits.max_bytes}",
                param="session_id",
            )
        conn.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
            (sid, text, created, time.time(), len(text)),
        )
        self._expire(conn, keep=sid)

    def _expire(self, conn: Any, keep: str | None = None) -> None:
        """Drop idle sessions, then the least recently used past the count and byte limits."""
        if self.limits.idle_ttl_secs is not None:
            cutoff = time.time() - self.limits.idle_ttl_secs
            conn.execute("DELETE FROM sessions WHERE updated < ? AND id IS NOT ?", (cutoff, keep))
        rows = conn.execute(
            "SELECT s.id, s.bytes + COALESCE((SELECT SUM(LENGTH(f.data)) FROM files f "
            "WHERE f.session_id = s.id), 0) FROM sessions s ORDER BY s.updated DESC, s.id"
        ).fetchall()
        total, kept = 0, 0
        for sid, size in rows:
            total += size
            kept += 1
            if sid != keep and (kept > self.limits.max_sessions or total > self.limits.max_bytes):
                conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                total -= size
                kept -= 1


def _checked_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidRequestError("must be a list of chat messages", param="messages")
    out = []
    for i, item in enumerate(value):
        try:
            message = ChatMessage.model_validate(item)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise InvalidRequestError(error["msg"], param=f"messages[{i}].{where}") from e
        out.append(message.model_dump(exclude_none=True))
    return out


def _checked_files(value: Any) -> list[tuple[str, str, str, bytes, float]]:
    if not isinstance(value, list):
        raise InvalidRequestError("must be a list", param="files")
    out: list[tuple[str, str, str, bytes, float]] = []
    for i, item in enumerate(value):
        try:
            fid, name, media_type = item["id"], item["filename"], item["media_type"]
            data = base64.b64decode(item["data"], validate=True)
            created = float(item.get("created_at", time.time()))
        except (KeyError, TypeError) as e:
            raise InvalidRequestError(
                f"needs id, filename, media_type and data: {e}", param=f"files[{i}]"
            ) from e
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(f"not base64 / a number: {e}", param=f"files[{i}]") from e
        if not all(isinstance(v, str) for v in (fid, name, media_type)):
            raise InvalidRequestError("id, filename and media_type are text", f"files[{i}]")
        if any(fid == f[0] for f in out):  # found by fuzzing: a 500 from SQLite's UNIQUE
            raise InvalidRequestError(f"file id {fid!r} appears twice", f"files[{i}].id")
        out.append((fid, name, media_type, data, created))
    return out
