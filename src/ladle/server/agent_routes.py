"""The agent runtime's routes: sessions, the files tools made, and the MCP tools connected.

    GET    /v1/sessions                 the stored sessions, most recently used first
    GET    /v1/sessions/{id}            one session, exported (what PUT takes back)
    PUT    /v1/sessions/{id}            import an exported session under this id
    DELETE /v1/sessions/{id}
    POST   /v1/sessions/{id}/fork       {"dest": ID, "num_turns": N}: copy into a new session
    GET    /v1/files/{id}               a tool's file: OpenAI's file object
    GET    /v1/files/{id}/content       its body, with its media type
    GET    /v1/mcp/tools                the MCP servers' tools, and the servers that failed

Chat requests reach sessions and tools through `session_id` and the model's tools, on the
OpenAI routes; these only inspect and manage what they stored. Every store call is a short
SQLite transaction, made on the event loop.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ladle.errors import InvalidRequestError
from ladle.tools.runtime import Toolbox


class AgentRoutes:
    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    def routes(self) -> list[Route]:
        return [
            Route("/v1/sessions", self.list_sessions, methods=["GET"]),
            Route("/v1/sessions/{id}", self.get_session, methods=["GET"]),
            Route("/v1/sessions/{id}", self.put_session, methods=["PUT"]),
            Route("/v1/sessions/{id}", self.delete_session, methods=["DELETE"]),
            Route("/v1/sessions/{id}/fork", self.fork_session, methods=["POST"]),
            Route("/v1/files/{id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{id}/content", self.get_file_content, methods=["GET"]),
            Route("/v1/mcp/tools", self.mcp_tools, methods=["GET"]),
        ]

    async def list_sessions(self, request: Request) -> Response:
        sessions = self.toolbox.sessions
        data = [
            _summary(s.id, s.created_at, s.updated_at, len(s.messages))
            for s in (sessions.get(i) for i in sessions.ids())
            if s is not None
        ]
        return JSONResponse({"object": "list", "data": data})

    async def get_session(self, request: Request) -> Response:
        return JSONResponse(self.toolbox.sessions.export(request.path_params["id"]))

    async def put_session(self, request: Request) -> Response:
        body = await _json_body(request)
        sid = self.toolbox.sessions.import_(body, session_id=request.path_params["id"])
        return self._summary_of(sid)

    async def delete_session(self, request: Request) -> Response:
        sid = request.path_params["id"]
        self.toolbox.sessions.delete(sid)
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    async def fork_session(self, request: Request) -> Response:
        body = await _json_body(request)
        dest, num_turns = body.get("dest"), body.get("num_turns")
        if not isinstance(dest, str):
            raise InvalidRequestError("the new session's id is required (a string)", "dest")
        if num_turns is not None and (not isinstance(num_turns, int) or num_turns < 0):
            raise InvalidRequestError("must be a non-negative integer or null", "num_turns")
        self.toolbox.sessions.fork(request.path_params["id"], dest, num_turns)
        return self._summary_of(dest)

    async def get_file(self, request: Request) -> Response:
        f = self.toolbox.find_file(request.path_params["id"])
        return JSONResponse(
            {
                "id": f.id,
                "object": "file",
                "bytes": f.size,
                "created_at": f.created_at,
                "filename": f.name,
                "purpose": "assistants_output",
                "media_type": f.media_type,
                "session_id": f.session_id,
            }
        )

    async def get_file_content(self, request: Request) -> Response:
        f = self.toolbox.find_file(request.path_params["id"])
        disposition = f"attachment; filename*=UTF-8''{quote(f.name, safe='')}"
        return Response(
            f.data, media_type=f.media_type, headers={"Content-Disposition": disposition}
        )

    async def mcp_tools(self, request: Request) -> Response:
        tools = [{"name": n, "description": d} for n, d in self.toolbox.list_mcp_tools()]
        return JSONResponse(
            {"object": "list", "data": tools, "failed_servers": self.toolbox.mcp_failures()}
        )

    def _summary_of(self, sid: str) -> Response:
        s = self.toolbox.sessions.require(sid)
        return JSONResponse(_summary(s.id, s.created_at, s.updated_at, len(s.messages)))


def _summary(sid: str, created: float, updated: float, messages: int) -> dict[str, Any]:
    return {
        "id": sid,
        "object": "session",
        "created_at": int(created),
        "updated_at": int(updated),
        "messages": messages,
    }


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise InvalidRequestError(f"the body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return body
