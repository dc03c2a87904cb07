"""Request bodies have a size limit: past it, a 413 with an OpenAI error body, read no further.

A body that declares its size (`Content-Length`) over the limit is refused before a byte of
it is read; one that streams (chunked) is counted as it arrives and refused where it crosses
the limit, so no request makes the service hold more than the limit in memory.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ladle.server.errors import RequestTooLargeError, error_response


class BodyLimit:
    """ASGI middleware: at most `limit` bytes of body per request."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(RequestTooLargeError(self.limit))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside the route: its handler answers 413
                    raise RequestTooLargeError(self.limit)
            return message

        await self.app(scope, counted, send)
