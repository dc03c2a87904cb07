"""MCP servers' tools as ladle `ServerTool`s, through the official `mcp` SDK (2.x).

The SDK's connections (`mcp.Client` over `stdio_client` or `streamable_http_client`) are
async context managers built on anyio task groups, which must be entered and left by the same
task. So each server gets one long-lived task on the caller's event loop: it opens the
transport and the client, lists the tools, then waits until `aclose()` (or until a call finds
the connection dead) and unwinds that same stack. Tool calls, from any task on that loop, only
send requests through the open session. A server that fails to start or dies mid-call is
recorded in `failures` and never takes the others down. Leaving a stdio server's context runs
the SDK's shutdown (close stdin, then kill the process group), so no subprocess outlives it.

`mcp` is an optional extra (`pip install 'ladle[mcp]'`), imported when `start()` runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import mimetypes
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TextIO, cast
from urllib.parse import urlparse

from ladle.errors import InvalidRequestError
from ladle.tools.callbacks import ServerTool, ToolFile, ToolOutput

if TYPE_CHECKING:
    from mcp import Client
    from mcp_types import CallToolResult, Tool

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECS = 30.0  # to spawn or reach a server, initialize it and list its tools
_HTTP_TYPES = ("http", "streamable-http", "streamableHttp")


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One MCP server: a command to run (stdio) or a URL (streamable HTTP). A stdio server
    gets the SDK's default environment (HOME, PATH, USER, ...) with `env` merged over it, as
    Claude Desktop does, not the whole of `os.environ`."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    url: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        where = f"mcpServers.{self.name}"
        if not self.name:
            raise InvalidRequestError("an MCP server needs a name", param="mcpServers")
        if (self.command is None) == (self.url is None):
            message = f"MCP server {self.name!r} needs exactly one of command (stdio) or url"
            raise InvalidRequestError(message, param=f"{where}.command")
        if self.url is not None and urlparse(self.url).scheme not in ("http", "https"):
            message = f"MCP server {self.name!r}: url {self.url!r} is not http(s)"
            raise InvalidRequestError(message, param=f"{where}.url")
        object.__setattr__(self, "args", tuple(self.args))


@dataclass(frozen=True, slots=True)
class McpClientConfig:
    """The servers, and how their tools are called. With `auto_register_tools` False the
    runtime lists the tools but does not offer them to the model. `tool_timeout_secs` bounds
    each call (not its wait for a free slot); `max_concurrent_calls` is shared by all servers.
    """

    servers: tuple[McpServerConfig, ...] | list[McpServerConfig]
    auto_register_tools: bool = True
    tool_timeout_secs: float | None = 60.0
    max_concurrent_calls: int | None = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "servers", tuple(self.servers))
        names = [server.name for server in self.servers]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"MCP server names repeat: {names}", param="mcpServers")
        if self.tool_timeout_secs is not None and not self.tool_timeout_secs > 0:
            raise InvalidRequestError("must be positive or null", param="toolTimeoutSecs")
        if self.max_concurrent_calls is not None and self.max_concurrent_calls < 1:
            raise InvalidRequestError("must be at least 1 or null", param="maxConcurrentCalls")


def load_mcp_config(path: str | os.PathLike[str]) -> McpClientConfig:
    """Read the JSON file MCP users keep for Claude Desktop, Cursor or VS Code:
    `{"mcpServers": {name: {"command", "args", "env"} or {"url", "headers"}}}` (VS Code's
    "servers" key is read too; an optional "type" is "stdio", "http", "streamable-http" or
    "streamableHttp"). Optional top-level keys override the defaults: "toolTimeoutSecs"
    (number or null), "maxConcurrentCalls" (integer or null), "autoRegisterTools" (boolean)."""
    where = Path(path)
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidRequestError(f"cannot read MCP config {where}: {e}", "mcp_config") from e
    except ValueError as e:
        raise InvalidRequestError(f"MCP config {where} is not JSON: {e}", "mcp_config") from e
    entries = data.get("mcpServers", data.get("servers")) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise InvalidRequestError(f'{where} has no "mcpServers" object', param="mcpServers")
    options: dict[str, Any] = {}
    for key, attr, kinds in (
        ("toolTimeoutSecs", "tool_timeout_secs", (int, float, type(None))),
        ("maxConcurrentCalls", "max_concurrent_calls", (int, type(None))),
        ("autoRegisterTools", "auto_register_tools", (bool,)),
    ):
        value = data.get(key, options)
        if value is not options:
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise InvalidRequestError(f"{where}: {key} cannot be {value!r}", param=key)
            options[attr] = value
    try:
        servers = [_server(name, entry) for name, entry in entries.items()]
        return McpClientConfig(servers, **options)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{where}: {e.message}", param=e.param) from e


def _server(name: str, entry: Any) -> McpServerConfig:
    def bad(key: str, why: str) -> InvalidRequestError:
        return InvalidRequestError(f"MCP server {name!r} {why}", param=f"mcpServers.{name}.{key}")

    if not isinstance(entry, dict):
        raise bad("command", "is not an object")
    kind = entry.get("type", "http" if "url" in entry else "stdio")
    if kind != "stdio" and kind not in _HTTP_TYPES:
        raise bad("type", f"has type {kind!r}: ladle speaks stdio and streamable HTTP")
    if kind == "stdio" and not isinstance(entry.get("command"), str):
        raise bad("command", 'has neither "command" nor "url"')
    if kind != "stdio" and not isinstance(entry.get("url"), str):
        raise bad("url", 'has no "url"')
    for key, kind_of in (("args", list), ("env", dict), ("headers", dict)):
        if key in entry and not _strings(entry[key], kind_of):
            raise bad(key, f'has "{key}" that are not all strings')
    if kind == "stdio":
        return McpServerConfig(
            name, entry["command"], tuple(entry.get("args", ())), entry.get("env")
        )
    return McpServerConfig(name, url=entry["url"], headers=entry.get("headers"))


def _strings(value: Any, kind: type) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return isinstance(value, kind) and all(isinstance(v, str) for v in items)


@dataclass(eq=False)
class _Connection:
    config: McpServerConfig
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # connected, or given up
    client: Client | None = None  # while the session is open and usable
    tools: list[Tool] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stderr: TextIO | None = None  # a stdio server's stderr, read back for failure reasons


class McpClients:
    """Connections to the configured servers, held open on ONE asyncio event loop (the
    caller's): `start()`, `aclose()` and every tool's `run` must be awaited on that loop."""

    def __init__(self, config: McpClientConfig) -> None:
        self.config = config
        self.failures: dict[str, str] = {}
        self._connections = [_Connection(server) for server in config.servers]
        self._tools: list[tuple[_Connection, ServerTool]] = []
        limit = config.max_concurrent_calls
        self._slots = asyncio.Semaphore(limit) if limit is not None else None

    async def start(self) -> None:
        """Connect every server at once; one that cannot start is logged and recorded in
        `failures`, and the others go on."""
        try:
            import mcp  # noqa: F401
        except ImportError as e:
            message = "MCP tools need the mcp package: pip install 'ladle[mcp]'"
            raise InvalidRequestError(message, param="mcp") from e
        for conn in self._connections:
            conn.task = asyncio.create_task(self._serve(conn), name=f"mcp:{conn.config.name}")
        await asyncio.gather(*(conn.ready.wait() for conn in self._connections))
        self._tools = self._name_tools()

    def tools(self) -> list[ServerTool]:
        """Every tool of every live server (whatever `auto_register_tools` says). Names stay
        as `start()` made them, even once a server they collided with has died."""
        return [tool for conn, tool in self._tools if conn.client is not None]

    def list_tools(self) -> list[tuple[str, str]]:
        """(name, description) of every tool of the live servers."""
        return [(tool.name, tool.description) for tool in self.tools()]

    async def aclose(self) -> None:
        """Close every session and transport (stdio servers are stopped); idempotent."""
        for conn in self._connections:
            conn.stop.set()
            if conn.task is not None and not conn.ready.is_set():
                conn.task.cancel()  # still starting; the SDK's process shutdown is shielded
        await asyncio.gather(*(c.task for c in self._connections if c.task), return_exceptions=True)

    async def _serve(self, conn: _Connection) -> None:
        """The one task that opens, holds and closes `conn`'s connection."""
        startup = asyncio.timeout(STARTUP_TIMEOUT_SECS)
        with _stderr_file(conn.config) as conn.stderr:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with startup:
                        client = await stack.enter_async_context(await _client(conn, stack))
                        conn.tools = await _all_tools(client)
                    conn.client = client
                    conn.ready.set()
                    await conn.stop.wait()
                    conn.client = None
            except Exception as e:
                if conn.stop.is_set():
                    logger.debug("closing MCP server %r: %s", conn.config.name, _reason(e))
                elif startup.expired():
                    self._fail(conn, f"did not start within {STARTUP_TIMEOUT_SECS:g} s")
                else:
                    self._fail(conn, _reason(e))
            finally:
                conn.client, conn.stderr = None, None
                conn.ready.set()

    def _fail(self, conn: _Connection, reason: str) -> None:
        if conn.stderr is not None:  # the last lines the server wrote, squeezed onto one
            conn.stderr.seek(0)
            lines = [" ".join(line.split()) for line in conn.stderr.read().splitlines()]
            tail = " | ".join(line for line in lines[-5:] if line)[-500:]
            reason += f" (stderr: {tail})" if tail else ""
        self.failures[conn.config.name] = reason
        logger.warning("MCP server %r failed: %s", conn.config.name, reason)

    def _name_tools(self) -> list[tuple[_Connection, ServerTool]]:
        """Each server's own tool names, but `<server>__<tool>` for every name more than one
        server offers; all made safe for function calling ([A-Za-z0-9_-])."""
        offered = [(conn, tool) for conn in self._connections if conn.client for tool in conn.tools]
        counts = Counter(_safe(tool.name) for _, tool in offered)
        named: list[tuple[_Connection, ServerTool]] = []
        for conn, tool in offered:
            name = _safe(tool.name)
            if counts[name] > 1:
                name = f"{_safe(conn.config.name)}__{name}"
            unique, n = name, 1
            while any(unique == other.name for _, other in named):  # "a.b", "a_b" on one server
                n += 1
                unique = f"{name}_{n}"
            run = functools.partial(self._call, conn, tool.name, unique)
            description, source = tool.description or "", f"mcp:{conn.config.name}"
            named.append((conn, ServerTool(unique, description, tool.input_schema, run, source)))
        return named

    async def _call(
        self, conn: _Connection, tool: str, name: str, arguments: dict[str, Any]
    ) -> ToolOutput:
        import mcp
        from mcp_types import CONNECTION_CLOSED

        server, timeout = conn.config.name, self.config.tool_timeout_secs
        deadline = asyncio.timeout(timeout)
        try:
            async with self._slots if self._slots is not None else contextlib.nullcontext():
                client = conn.client
                if client is None:
                    why = f"MCP server {server!r} is down: {self.failures.get(server, 'closed')}"
                    return ToolOutput(f"tool {name} failed: {why}", (), True)
                async with deadline:
                    result = await client.call_tool(tool, arguments)
        except Exception as e:
            if isinstance(e, TimeoutError) and deadline.expired():
                return ToolOutput(f"tool {name} timed out after {timeout:g} s", (), True)
            reason = _reason(e)
            if isinstance(e, mcp.MCPError) and e.code == CONNECTION_CLOSED and conn.client:
                reason = f"the connection to MCP server {server!r} is gone: {reason}"
                await self._drop(conn, reason)
            return ToolOutput(f"tool {name} failed: {reason}", (), True)
        return _output(name, result)

    async def _drop(self, conn: _Connection, reason: str) -> None:
        """Mark a server whose connection died as failed, and wait for its task to unwind
        (by then a stdio server's process is reaped)."""
        self._fail(conn, reason)
        conn.client = None
        conn.stop.set()
        if conn.task is not None:
            await asyncio.wait([conn.task])  # a cancelled caller leaves the task running


async def _client(conn: _Connection, stack: contextlib.AsyncExitStack) -> Client:
    """An un-entered `mcp.Client` for the server; an HTTP server's `httpx2` client (carrying
    the configured headers) is entered on `stack`."""
    import httpx2
    import mcp
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    from ladle import __version__

    c, info = conn.config, mcp.Implementation(name="ladle", version=__version__)
    if c.command is not None:
        params = mcp.StdioServerParameters(command=c.command, args=list(c.args), env=c.env)
        return mcp.Client(stdio_client(params, errlog=cast(TextIO, conn.stderr)), client_info=info)
    assert c.url is not None
    timeout = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults for MCP over HTTP
    http = await stack.enter_async_context(httpx2.AsyncClient(headers=c.headers, timeout=timeout))
    return mcp.Client(streamable_http_client(c.url, http_client=http), client_info=info)


async def _all_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(100):  # a paginator that never ends cannot hang start()
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        if (cursor := page.next_cursor) is None:
            break
    return tools


def _output(tool: str, result: CallToolResult) -> ToolOutput:
    """An MCP tool result as ladle's: text blocks joined, images, audio and blobs as files."""
    import mcp_types as mt

    texts: list[str] = []
    files: list[ToolFile] = []
    for block in result.content:
        if isinstance(block, mt.TextContent):
            texts.append(block.text)
        elif isinstance(block, mt.ImageContent | mt.AudioContent):
            name = f"{tool}-{len(files) + 1}{_extension(block.mime_type)}"
            files.append(ToolFile(name, block.mime_type, base64.b64decode(block.data)))
        elif isinstance(block, mt.EmbeddedResource):
            res = block.resource
            if isinstance(res, mt.TextResourceContents):
                texts.append(res.text)
                continue
            name = PurePosixPath(urlparse(res.uri).path).name or f"{tool}-{len(files) + 1}"
            media = res.mime_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
            files.append(ToolFile(name, media, base64.b64decode(res.blob)))
        elif isinstance(block, mt.ResourceLink):
            about = f" ({block.description})" if block.description else ""
            texts.append(f"resource {block.name}: {block.uri}{about}")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content))
    return ToolOutput("\n".join(texts), tuple(files), result.is_error)


def _stderr_file(server: McpServerConfig) -> contextlib.AbstractContextManager[TextIO | None]:
    """Where a stdio server's stderr goes: a temporary file, read back when the server fails
    (piped to ladle's own stderr, every server's logging would spam it)."""
    if server.command is None:
        return contextlib.nullcontext()
    return cast(TextIO, tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))


def _extension(media_type: str) -> str:
    """A file extension for a media type: ".png" for "image/png", and ".wav" for "audio/wav"
    even where `mimetypes` does not know it."""
    subtype = media_type.partition("/")[2].partition(";")[0].partition("+")[0]
    fallback = re.sub(r"[^a-z0-9]", "", subtype.lower().removeprefix("x-"))
    return mimetypes.guess_extension(media_type) or (f".{fallback}" if fallback else "")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def _reason(error: BaseException) -> str:
    """The first error inside (anyio's task groups wrap them), on one line."""
    import mcp

    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, mcp.MCPError):
        return str(error)
    return f"{type(error).__name__}: {error}".removesuffix(": ")
