"""A real MCP server over stdio, written with the SDK's own `MCPServer`, for tests/test_mcp.py.

Run as `python tests/mcp_servers/stdio_server.py`: it speaks MCP on stdin/stdout until stdin
closes. Its tools cover what ladle's client has to convert or survive: text, an image, an
error, a slow call (with its start and end times, so tests can see overlap), a crash mid-call.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
import zlib

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ResourceLink,
    TextContent,
    TextResourceContents,
)

server = MCPServer("ladle-test-stdio", log_level="WARNING")


def tiny_png() -> bytes:
    """A 1x1 red PNG, built by hand: signature, IHDR, IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte 0, then one red pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def weather(city: str) -> str:
    """Today's weather in a city (always sunny here)."""
    return f"Sunny, 21 C in {city}"


@server.tool()
def make_image() -> Image:
    """A tiny PNG image."""
    return Image(data=tiny_png(), format="png")


@server.tool()
def fail(message: str) -> str:
    """Always fails, with the given message."""
    raise ToolError(message)  # any other exception's message is hidden from the client


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep, then answer "slept <start> <end>" in this process's monotonic clock."""
    start = time.monotonic()
    await asyncio.sleep(seconds)
    return f"slept {start} {time.monotonic()}"


@server.tool()
def crash() -> str:
    """Kill this server in the middle of the call."""
    os._exit(1)


@server.tool()
def echo_env(name: str) -> str:
    """The value of an environment variable of this server ("" when unset)."""
    return os.environ.get(name, "")


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool(name="notes.read")
def read_notes() -> str:
    """A tool whose name function calling does not allow (the dot)."""
    return "buy soup"


@server.tool()
def mixed() -> CallToolResult:
    """One of each other kind of content: embedded text and blob, a link, audio."""
    blob = base64.b64encode(b"%PDF-1.4 tiny").decode()
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    return CallToolResult(
        content=[
            TextContent(text="here you are"),
            EmbeddedResource(resource=TextResourceContents(uri="file:///notes.txt", text="a note")),
            EmbeddedResource(
                resource=BlobResourceContents(
                    uri="file:///data/report.pdf", mime_type="application/pdf", blob=blob
                )
            ),
            ResourceLink(uri="https://example.com/doc", name="doc", description="the manual"),
            AudioContent(data=wav, mime_type="audio/wav"),
        ]
    )


@server.tool()
def structured() -> CallToolResult:
    """Structured content and no text at all."""
    return CallToolResult(content=[], structured_content={"temperature": 21})


if __name__ == "__main__":
    server.run("stdio")
