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

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.protocol.agents import (
    FileObject,
    ForkRequest,
    McpTool,
    McpToolList,
    SessionDeleted,
    SessionExport,
    SessionImport,
    SessionList,
    SessionSummary,
)
from ladle.protocol.openai import SESSION_ID_PATTERN, Wire, parse_body
from ladle.server.openapi import Operation, documented
from ladle.tools.runtime import Toolbox
from ladle.tools.sessions import Session

TAG = "Agents"
SESSION = {"id": {"type": "string", "pattern": SESSION_ID_PATTERN}}  # the path's id


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

    @documented(Operation("Stored sessions, most recently used first", TAG, returns=SessionList))
    async def list_sessions(self, request: Request) -> Response:
        sessions = self.toolbox.sessions
        found = (sessions.get(i) for i in sessions.ids())
        return _json(SessionList(data=[_summary(s) for s in found if s is not None]))

    @documented(
        Operation("A session, exported", TAG, returns=SessionExport, path=SESSION, errors=(404,))
    )
    async def get_session(self, request: Request) -> Response:
        exported = self.toolbox.sessions.export(request.path_params["id"])
        body = SessionExport.model_validate(exported)  # as documented, and as the SDK exports
        return Response(body.model_dump_json(exclude_none=True), media_type="application/json")

    @documented(
        Operation(
            "Import a session under this id",
            TAG,
            body=SessionImport,
            returns=SessionSummary,
            path=SESSION,
        )
    )
    async def put_session(self, request: Request) -> Response:
        body = parse_body(SessionImport, await request.body())
        data = body.model_dump(exclude_none=True)
        sid = self.toolbox.sessions.import_(data, session_id=request.path_params["id"])
        return self._summary_of(sid)

    @documented(
        Operation("Delete a session", TAG, returns=SessionDeleted, path=SESSION, errors=(404,))
    )
    async def delete_session(self, request: Request) -> Response:
        sid = request.path_params["id"]
        self.toolbox.sessions.delete(sid)
        return _json(SessionDeleted(id=sid, deleted=True))

    @documented(
        Operation(
            "Copy a session's first turns into a new one",
            TAG,
            body=ForkRequest,
            returns=SessionSummary,
            path=SESSION,
            errors=(400, 404),
        )
    )
    async def fork_session(self, request: Request) -> Response:
        body = parse_body(ForkRequest, await request.body())
        self.toolbox.sessions.fork(request.path_params["id"], body.dest, body.num_turns)
        return self._summary_of(body.dest)

    @documented(Operation("A file a tool made", TAG, returns=FileObject, errors=(404,)))
    async def get_file(self, request: Request) -> Response:
        f = self.toolbox.find_file(request.path_params["id"])
        return _json(
            FileObject(
                id=f.id,
                bytes=f.size,
                created_at=f.created_at,
                filename=f.name,
                media_type=f.media_type,
                session_id=f.session_id,
            )
        )

    @documented(
        Operation(
            "A tool file's body, in its media type",
            TAG,
            media_type="application/octet-stream",
            errors=(404,),
        )
    )
    async def get_file_content(self, request: Request) -> Response:
        f = self.toolbox.find_file(request.path_params["id"])
        disposition = f"attachment; filename*=UTF-8''{quote(f.name, safe='')}"
        return Response(
            f.data, media_type=f.media_type, headers={"Content-Disposition": disposition}
        )

    @documented(
        Operation("The MCP servers' tools, and the servers that failed", TAG, returns=McpToolList)
    )
    async def mcp_tools(self, request: Request) -> Response:
        tools = [McpTool(name=n, description=d) for n, d in self.toolbox.list_mcp_tools()]
        return _json(McpToolList(data=tools, failed_servers=self.toolbox.mcp_failures()))

    def _summary_of(self, sid: str) -> Response:
        return _json(_summary(self.toolbox.sessions.require(sid)))


def _summary(session: Session) -> SessionSummary:
    return SessionSummary(
        id=session.id,
        created_at=int(session.created_at),
        updated_at=int(session.updated_at),
        messages=len(session.messages),
    )


def _json(body: Wire) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
