"""ladle's MCP client (ladle.tools.mcp) against real MCP servers written with the SDK's own
`MCPServer`: tests/mcp_servers/stdio_server.py (run by the client as a subprocess) and
tests/mcp_servers/http_server.py (streamable HTTP, started once for the module).

The SDK's connections are bound to the event loop that opened them, so the module shares one
`asyncio.Runner`: the clients most tests use are started once on it, and each test runs its
async body there. No timed assertions: concurrency shows in the start and end times the
server's `sleep` tool reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ladle.errors import InvalidRequestError
from ladle.tools import mcp as ladle_mcp
from ladle.tools.callbacks import ServerTool, ToolOutput
from ladle.tools.mcp import McpClientConfig, McpClients, McpServerConfig, load_mcp_config

SERVERS = Path(__file__).parent / "mcp_servers"
TOKEN = "s3cret-token"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STDIO_TOOLS = {
    "add",
    "make_image",
    "fail",
    "sleep",
    "crash",
    "echo_env",
    "pid",
    "mixed",
    "structured",
    "notes_read",  # the server's "notes.read", made safe for function calling
}
T = TypeVar("T")


def stdio_server(name: str = "local", env: dict[str, str] | None = None) -> McpServerConfig:
    return McpServerConfig(name, sys.executable, (str(SERVERS / "stdio_server.py"),), env)


@pytest.fixture(scope="module")
def http_url(mcp_http_server: tuple[str, str]) -> str:
    """The streamable-HTTP test server (tests/conftest.py), which wants `TOKEN`."""
    url, token = mcp_http_server
    assert token == TOKEN
    return url


def remote(url: str, token: str | None = TOKEN, name: str = "remote") -> McpServerConfig:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return McpServerConfig(name, url=url, headers=headers)


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def clients(runner: asyncio.Runner, http_url: str) -> Iterator[McpClients]:
    """Both servers, a 1 s tool timeout and two call slots. The test process's own
    LADLE_MCP_LEAK is set while the stdio server starts: it must not reach it."""
    config = McpClientConfig(
        [stdio_server(env={"LADLE_MCP_GREETING": "hello from the config"}), remote(http_url)],
        tool_timeout_secs=1.0,
        max_concurrent_calls=2,
    )
    mcp_clients = McpClients(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LADLE_MCP_LEAK", "from the parent")
        runner.run(mcp_clients.start())
    yield mcp_clients
    runner.run(mcp_clients.aclose())


def call(runner: asyncio.Runner, tools: McpClients, tool: str, **arguments: Any) -> ToolOutput:
    return run(runner, by_name(tools)[tool].run(arguments))


def by_name(clients: McpClients) -> dict[str, ServerTool]:
    return {tool.name: tool for tool in clients.tools()}


def run(runner: asyncio.Runner, body: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await body

    return runner.run(wrapped())


def intervals(outputs: list[ToolOutput]) -> list[tuple[float, float]]:
    """The (start, end) each `sleep` call reported, in the server's monotonic clock."""
    spans = []
    for output in outputs:
        word, start, end = output.text.split()
        assert word == "slept" and not output.is_error
        spans.append((float(start), float(end)))
    return spans


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- tools and calls --------------------------------------------------------------------------


def test_both_servers_tools_are_listed_and_only_the_colliding_name_is_namespaced(
    clients: McpClients,
) -> None:
    assert clients.failures == {}
    names = {name for name, _ in clients.list_tools()}
    assert names == STDIO_TOOLS | {"local__weather", "remote__weather", "lookup"}
    tools = by_name(clients)
    assert tools["add"].source == "mcp:local"
    assert tools["lookup"].source == tools["remote__weather"].source == "mcp:remote"
    assert tools["add"].description == "Add two integers."
    schema = tools["add"].parameters
    assert schema["type"] == "object" and schema["required"] == ["a", "b"]
    assert schema["properties"]["a"]["type"] == "integer"
    assert tools["add"].definition()["function"]["name"] == "add"


def test_each_tool_calls_its_own_server(runner: asyncio.Runner, clients: McpClients) -> None:
    assert call(runner, clients, "add", a=2, b=3) == ToolOutput("5")
    assert call(runner, clients, "local__weather", city="Oslo").text == "Sunny, 21 C in Oslo"
    assert call(runner, clients, "remote__weather", city="Oslo").text == "Rain, 9 C in Oslo"
    assert call(runner, clients, "lookup", key="ladle").text == "a spoon for soup"
    assert call(runner, clients, "notes_read").text == "buy soup"  # called by its own name


def test_an_image_comes_back_as_a_png_file(runner: asyncio.Runner, clients: McpClients) -> None:
    output = call(runner, clients, "make_image")
    assert not output.is_error and output.text == ""
    [image] = output.files
    assert image.media_type == "image/png" and image.name == "make_image-1.png"
    assert image.data.startswith(PNG_SIGNATURE) and image.data.endswith(b"IEND\xaeB`\x82")


def test_every_other_kind_of_content_is_converted(
    runner: asyncio.Runner, clients: McpClients
) -> None:
    output = call(runner, clients, "mixed")
    assert output.text.split("\n") == [
        "here you are",
        "a note",
        "resource doc: https://example.com/doc (the manual)",
    ]
    pdf, wav = output.files
    assert (pdf.name, pdf.media_type, pdf.data) == (
        "report.pdf",
        "application/pdf",
        b"%PDF-1.4 tiny",
    )
    assert (wav.name, wav.media_type, wav.data) == ("mixed-2.wav", "audio/wav", b"RIFF....WAVE")
    assert json.loads(call(runner, clients, "structured").text) == {"temperature": 21}


def test_an_error_and_a_timeout_are_results_and_the_servers_go_on(
    runner: asyncio.Runner, clients: McpClients
) -> None:
    failed = call(runner, clients, "fail", message="the pot boiled over")
    assert failed.is_error and "the pot boiled over" in failed.text
    slow = call(runner, clients, "sleep", seconds=3)
    assert slow == ToolOutput("tool sleep timed out after 1 s", is_error=True)
    invalid = call(runner, clients, "add", a="two", b=3)  # the server rejects the arguments
    assert invalid.is_error and "valid integer" in invalid.text
    assert clients.failures == {}
    assert call(runner, clients, "add", a=1, b=1).text == "2"
    assert call(runner, clients, "lookup", key="ladle").text == "a spoon for soup"


def test_two_slots_let_two_calls_overlap(runner: asyncio.Runner, clients: McpClients) -> None:
    sleep = by_name(clients)["sleep"]
    both = run(runner, asyncio.gather(sleep.run({"seconds": 0.5}), sleep.run({"seconds": 0.5})))
    (start1, end1), (start2, end2) = intervals(list(both))
    assert start1 < end2 and start2 < end1


def test_env_reaches_the_stdio_server_over_the_default_environment(
    runner: asyncio.Runner, clients: McpClients
) -> None:
    assert call(runner, clients, "echo_env", name="LADLE_MCP_GREETING").text == (
        "hello from the config"
    )
    assert call(runner, clients, "echo_env", name="PATH").text == os.environ["PATH"]
    assert call(runner, clients, "echo_env", name="LADLE_MCP_LEAK").text == ""


# --- limits, failures, shutdown ---------------------------------------------------------------


def test_one_slot_runs_calls_one_after_another_and_aclose_ends_the_process(
    runner: asyncio.Runner,
) -> None:
    mcp_clients = McpClients(McpClientConfig([stdio_server()], max_concurrent_calls=1))
    run(runner, mcp_clients.start())
    try:
        sleep = by_name(mcp_clients)["sleep"]
        both = run(runner, asyncio.gather(sleep.run({"seconds": 0.2}), sleep.run({"seconds": 0.2})))
        (_, end1), (start2, _) = sorted(intervals(list(both)))
        assert end1 <= start2
        pid = int(call(runner, mcp_clients, "pid").text)
        assert not gone(pid)
    finally:
        run(runner, mcp_clients.aclose())
    assert gone(pid)
    run(runner, mcp_clients.aclose())  # idempotent
    assert mcp_clients.tools() == [] and mcp_clients.failures == {}
    late = run(runner, sleep.run({"seconds": 0}))
    assert late.is_error and "'local' is down" in late.text


def test_servers_that_cannot_start_are_named_and_the_rest_work(
    runner: asyncio.Runner, http_url: str
) -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{free.getsockname()[1]}/mcp"
    config = McpClientConfig(
        [
            McpServerConfig("missing", "/nonexistent/ladle-mcp-server"),
            remote(refused, name="refused"),
            remote(http_url, token=None, name="no-token"),
            remote(http_url, token="wrong", name="wrong-token"),
            remote(http_url),
        ]
    )
    mcp_clients = McpClients(config)
    run(runner, mcp_clients.start())
    try:
        assert set(mcp_clients.failures) == {"missing", "refused", "no-token", "wrong-token"}
        assert "No such file" in mcp_clients.failures["missing"]
        assert "ConnectError" in mcp_clients.failures["refused"]
        # only the live server offers `weather` now, so it keeps its own name
        assert {name for name, _ in mcp_clients.list_tools()} == {"weather", "lookup"}
        assert call(runner, mcp_clients, "lookup", key="ladle").text == "a spoon for soup"
    finally:
        run(runner, mcp_clients.aclose())


def test_a_server_that_does_not_answer_initialize_times_out(
    runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ladle_mcp, "STARTUP_TIMEOUT_SECS", 0.5)
    silent = McpServerConfig("silent", sys.executable, ("-c", "import sys; sys.stdin.read()"))
    mcp_clients = McpClients(McpClientConfig([silent]))
    run(runner, mcp_clients.start())
    assert mcp_clients.failures == {"silent": "did not start within 0.5 s"}
    assert mcp_clients.tools() == []
    run(runner, mcp_clients.aclose())


def test_a_crash_mid_call_fails_the_call_and_drops_the_server(
    runner: asyncio.Runner, http_url: str
) -> None:
    mcp_clients = McpClients(McpClientConfig([stdio_server(), remote(http_url)]))
    run(runner, mcp_clients.start())
    try:
        pid = int(call(runner, mcp_clients, "pid").text)
        add = by_name(mcp_clients)["add"]
        crashed = call(runner, mcp_clients, "crash")
        assert crashed.is_error and crashed.text.startswith("tool crash failed:")
        assert "local" in mcp_clients.failures and "local" in crashed.text
        assert gone(pid)
        assert {name for name, _ in mcp_clients.list_tools()} == {"remote__weather", "lookup"}
        after = run(runner, add.run({"a": 1, "b": 2}))
        assert after.is_error and "'local' is down" in after.text
        assert call(runner, mcp_clients, "lookup", key="ladle").text == "a spoon for soup"
    finally:
        run(runner, mcp_clients.aclose())


def test_start_without_the_mcp_package_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "mcp", None)  # `import mcp` now raises ImportError
    mcp_clients = McpClients(McpClientConfig([stdio_server()]))
    with pytest.raises(InvalidRequestError, match=r"pip install 'ladle\[mcp\]'") as error:
        asyncio.run(mcp_clients.start())
    assert error.value.param == "mcp"


# --- configuration ----------------------------------------------------------------------------


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_load_mcp_config_reads_both_kinds_of_server(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "mcpServers": {
                "files": {"command": "npx", "args": ["-y", "server-fs", "/tmp"], "env": {"A": "1"}},
                "typed": {"type": "stdio", "command": "uvx", "args": ["mcp-server-git"]},
                "web": {"url": "http://127.0.0.1:8000/mcp", "headers": {"Authorization": "B x"}},
                "web2": {"type": "streamableHttp", "url": "https://example.com/mcp"},
            },
            "toolTimeoutSecs": 5,
            "maxConcurrentCalls": None,
            "autoRegisterTools": False,
        },
    )
    config = load_mcp_config(path)
    assert config.servers == (
        McpServerConfig("files", "npx", ("-y", "server-fs", "/tmp"), {"A": "1"}),
        McpServerConfig("typed", "uvx", ("mcp-server-git",)),
        McpServerConfig("web", url="http://127.0.0.1:8000/mcp", headers={"Authorization": "B x"}),
        McpServerConfig("web2", url="https://example.com/mcp"),
    )
    assert config.tool_timeout_secs == 5
    assert config.max_concurrent_calls is None
    assert config.auto_register_tools is False
    defaults = load_mcp_config(write(tmp_path, {"mcpServers": {}}))
    assert (defaults.auto_register_tools, defaults.tool_timeout_secs) == (True, 60.0)
    assert defaults.max_concurrent_calls == 8


@pytest.mark.parametrize(
    ("content", "param", "words"),
    [
        (None, "mcp_config", "cannot read"),
        ("{not json", "mcp_config", "not JSON"),
        ({"servers2": {}}, "mcpServers", '"mcpServers"'),
        ({"mcpServers": {"x": {"args": ["a"]}}}, "mcpServers.x.command", "'x' has neither"),
        ({"mcpServers": {"x": {"type": "http"}}}, "mcpServers.x.url", "'x' has no \"url\""),
        ({"mcpServers": {"x": {"type": "sse", "url": "http://h"}}}, "mcpServers.x.type", "sse"),
        ({"mcpServers": {"x": {"command": "c", "args": [1]}}}, "mcpServers.x.args", "strings"),
        ({"mcpServers": {"x": {"command": "c", "env": {"A": 1}}}}, "mcpServers.x.env", "strings"),
        ({"mcpServers": {"x": {"url": "ftp://h"}}}, "mcpServers.x.url", "not http"),
        ({"mcpServers": {"x": []}}, "mcpServers.x.command", "not an object"),
        ({"mcpServers": {}, "toolTimeoutSecs": "5"}, "toolTimeoutSecs", "'5'"),
        ({"mcpServers": {}, "toolTimeoutSecs": 0}, "toolTimeoutSecs", "positive"),
        ({"mcpServers": {}, "maxConcurrentCalls": True}, "maxConcurrentCalls", "True"),
        ({"mcpServers": {}, "autoRegisterTools": "no"}, "autoRegisterTools", "'no'"),
    ],
)
def test_load_mcp_config_names_what_is_wrong(
    tmp_path: Path, content: Any, param: str, words: str
) -> None:
    path = tmp_path / "missing.json" if content is None else write(tmp_path, content)
    with pytest.raises(InvalidRequestError) as error:
        load_mcp_config(path)
    assert error.value.param == param
    assert str(path) in error.value.message and words in error.value.message


def test_a_server_config_needs_exactly_one_of_command_and_url() -> None:
    with pytest.raises(InvalidRequestError, match="'both' needs exactly one") as error:
        McpServerConfig("both", command="c", url="http://h")
    assert error.value.param == "mcpServers.both.command"
    with pytest.raises(InvalidRequestError, match="'neither' needs exactly one"):
        McpServerConfig("neither")
    with pytest.raises(InvalidRequestError, match="repeat"):
        McpClientConfig([McpServerConfig("a", "c"), McpServerConfig("a", "d")])
    assert McpServerConfig("s", "c", ["x"]).args == ("x",)  # type: ignore[arg-type]
    assert McpClientConfig([McpServerConfig("s", "c")]).servers == (McpServerConfig("s", "c"),)
