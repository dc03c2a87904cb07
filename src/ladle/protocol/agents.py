"""Wire types of the agent routes: sessions, tool files, MCP tools (`server/agent_routes.py`).

A session's export is what `export_session` returns and `PUT /v1/sessions/{id}` takes back;
the store (tools/sessions.py) checks an import itself, field by field, so the SDK and the
service refuse the same things.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ladle.protocol.openai import SESSION_ID_PATTERN, ChatMessage, Wire

BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"


class SessionFile(Wire):
    id: str
    filename: str
    media_type: str
    data: str = Field(json_schema_extra={"pattern": BASE64})
    created_at: float | None = None


class SessionImport(Wire):
    """An exported session; `id` is taken from the path when it is imported over HTTP."""

    id: str | None = None
    messages: list[ChatMessage]
    files: list[SessionFile] = Field(default_factory=list)
    created_at: float | None = None


class SessionExport(Wire):
    object: Literal["session"] = "session"
    id: str
    created_at: int
    updated_at: int
    messages: list[ChatMessage]
    files: list[SessionFile]


class SessionSummary(Wire):
    id: str
    object: Literal["session"] = "session"
    created_at: int
    updated_at: int
    messages: int  # how many


class SessionList(Wire):
    object: Literal["list"] = "list"
    data: list[SessionSummary]


class SessionDeleted(Wire):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool


class ForkRequest(Wire):
    dest: str = Field(json_schema_extra={"pattern": SESSION_ID_PATTERN})
    num_turns: int | None = Field(default=None, ge=0)


class FileObject(Wire):
    """OpenAI's file object, for a file a tool made."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["assistants_output"] = "assistants_output"
    media_type: str
    session_id: str | None


class McpTool(Wire):
    name: str
    description: str


class McpToolList(Wire):
    object: Literal["list"] = "list"
    data: list[McpTool]
    failed_servers: dict[str, str]
