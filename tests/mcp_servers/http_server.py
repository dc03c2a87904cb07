"""A real MCP server over streamable HTTP, written with the SDK's own `MCPServer`, for
tests/test_mcp.py.

Run as `python tests/mcp_servers/http_server.py PORT` (0 picks a free port): it binds
127.0.0.1 only, prints "PORT <n>" as its first line once the socket is bound, and serves MCP
at http://127.0.0.1:<n>/mcp until killed. When MCP_TEST_TOKEN is set, every request without
"Authorization: Bearer <token>" gets 401, so a client's configured headers can be tested.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

server = MCPServer("ladle-test-http", log_level="WARNING")


@server.tool()
def weather(city: str) -> str:
    """Today's weather in a city (always raining here)."""
    return f"Rain, 9 C in {city}"


@server.tool()
def lookup(key: str) -> str:
    """Look a key up in a tiny table."""
    return {"ladle": "a spoon for soup"}.get(key, f"no entry for {key}")


class RequireToken:
    """ASGI middleware: refuse HTTP requests that lack the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and dict(scope["headers"]).get(b"authorization") != self.expected
        ):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"missing or wrong token"})
            return
        await self.app(scope, receive, send)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app: Any = server.streamable_http_app(host="127.0.0.1")
    token = os.environ.get("MCP_TEST_TOKEN")
    if token:
        app = RequireToken(app, token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
