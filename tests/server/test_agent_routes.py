"""The agent runtime over HTTP: an `openai` client that knows nothing of ladle gets answers
that used MCP tools; sessions over `/v1/sessions`, persisted across a restart; tool files
over `/v1/files`; bad input as OpenAI error bodies.

The service reads a real `{"mcpServers": ...}` file naming the stdio test server, the
streamable-HTTP one (with its bearer token in `headers`) and one whose command does not exist.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ladle.server import ServerSettings

MCP_SERVERS = Path(__file__).parents[1] / "mcp_servers"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Services = Any  # tests/server/conftest.py's `serve`: starts, and stops, services


@pytest.fixture(scope="module")
def mcp_config(tmp_path_factory: pytest.TempPathFactory, mcp_http_server: tuple[str, str]) -> Path:
    url, token = mcp_http_server
    servers = {
        "local": {"command": sys.executable, "args": [str(MCP_SERVERS / "stdio_server.py")]},
        "remote": {"url": url, "headers": {"Authorization": f"Bearer {token}"}},
        "broken": {"command": "/nonexistent/mcp-server"},
    }
    path = tmp_path_factory.mktemp("mcp") / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sessions_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sessions") / "sessions.db"


@pytest.fixture(scope="module")
def server(serve: Services, mcp_config: Path, sessions_db: Path) -> Iterator[ServerSettings]:
    settings = serve(mcp_config=mcp_config, sessions_db=sessions_db)
    yield settings


@pytest.fixture(scope="module")
def client(server: ServerSettings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: ServerSettings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _ask(client: openai.OpenAI, text: str, tool: str, rounds: int | None = 1, **kw: Any) -> Any:
    """A chat request from a plain `openai` client that forces a call to `tool` (which only
    the service knows) and allows `rounds` rounds of tool calls."""
    return client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": text}],
        tool_choice={"type": "function", "function": {"name": tool}},
        temperature=0,
        max_tokens=40,
        extra_body={"max_tool_rounds": rounds},
        **kw,
    )


def _events(response: Any) -> list[dict[str, Any]]:
    return (response.model_extra or {}).get("agent_events") or []


def test_mcp_tools_are_listed_and_a_broken_server_is_named(http: httpx.Client) -> None:
    body = http.get("/v1/mcp/tools").json()
    names = {t["name"] for t in body["data"]}
    assert {"add", "lookup", "local__weather", "remote__weather"} <= names  # clash: namespaced
    assert "broken" in body["failed_servers"] and body["failed_servers"]["broken"]


def test_an_openai_client_gets_an_answer_that_used_an_mcp_tool(client: openai.OpenAI) -> None:
    reply = _ask(client, "What is the weather in Oslo?", "remote__weather", rounds=None)
    assert reply.choices[0].finish_reason == "stop"
    events = _events(reply)
    assert [e["type"] for e in events] == ["tool_call.started", "tool_call.finished"]
    assert events[1]["output"] == "Rain, 9 C in Oslo"  # the streamable-HTTP server answered
    assert "rain" in (reply.choices[0].message.content or "").lower()  # read from the result


def test_a_stream_carries_tool_progress_and_the_answer(client: openai.OpenAI) -> None:
    chunks = list(_ask(client, "Add 2 and 3.", "add", stream=True))
    events = [c.model_extra["agent_event"] for c in chunks if (c.model_extra or {}).get(
        "agent_event")]  # fmt: skip
    assert [e["type"] for e in events] == ["tool_call.started", "tool_call.finished"]
    assert events[1]["output"] == "5"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_files_are_served_by_id(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = _ask(client, "Make an image.", "make_image")
    created = [e for e in _events(reply) if e["type"] == "file.created"]
    assert len(created) == 1
    ref = created[0]["file"]
    meta = http.get(f"/v1/files/{ref['id']}").json()
    assert meta["object"] == "file" and meta["bytes"] == ref["bytes"]
    content = http.get(f"/v1/files/{ref['id']}/content")
    assert content.headers["content-type"] == "image/png"
    assert content.content.startswith(PNG_SIGNATURE) and len(content.content) == ref["bytes"]
    missing = http.get("/v1/files/file-missing")
    assert missing.status_code == 404 and "file-missing" in missing.json()["error"]["message"]


def test_a_failing_tool_is_the_models_business_not_a_500(client: openai.OpenAI) -> None:
    reply = _ask(client, "Fail please.", "fail")
    assert [e["type"] for e in _events(reply)] == ["tool_call.started", "tool_call.failed"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("GET", "/v1/sessions/nobody", None, 404, None),
        ("DELETE", "/v1/sessions/nobody", None, 404, None),
        ("POST", "/v1/sessions/nobody/fork", {"dest": "x"}, 404, None),
        ("PUT", "/v1/sessions/bad", {"messages": [{"role": "robot"}]}, 400, "messages[0].role"),
        ("PUT", "/v1/sessions/bad", {"messages": "no"}, 400, "messages"),
        ("PUT", "/v1/sessions/bad%20id", {"messages": []}, 400, "id"),
        (
            "PUT",
            "/v1/sessions/twice",
            {
                "messages": [],
                "files": [{"id": "f", "filename": "a", "media_type": "text/plain", "data": ""}] * 2,
            },
            400,
            "files[1].id",
        ),
        ("POST", "/v1/sessions/web/fork", {"num_turns": 1}, 400, "dest"),
    ],
)
def test_bad_session_requests_are_openai_errors(
    http: httpx.Client, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    if status == 404:
        assert "nobody" in error["message"]


def test_sessions_over_http_and_across_a_restart(
    serve: Services, server: ServerSettings, client: openai.OpenAI, http: httpx.Client,
    mcp_config: Path, sessions_db: Path,
) -> None:  # fmt: skip
    for text in ("My name is Ada.", "What is my name?"):
        client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": text}],
            max_tokens=12,
            temperature=0,
            extra_body={"session_id": "web"},
        )
    listed = http.get("/v1/sessions").json()["data"]
    assert {"id": "web", "messages": 4} .items() <= next(
        s for s in listed if s["id"] == "web").items()  # fmt: skip
    exported = http.get("/v1/sessions/web").json()
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"] * 2

    fork = http.post("/v1/sessions/web/fork", json={"dest": "web-1", "num_turns": 1})
    assert fork.status_code == 200 and fork.json()["messages"] == 2
    put = http.put("/v1/sessions/copy", json=exported)
    assert put.status_code == 200 and put.json()["id"] == "copy"

    serve.stop(server)  # the service restarts on the same store
    again = serve(mcp_config=mcp_config, sessions_db=sessions_db)
    with httpx.Client(base_url=again.url, timeout=60) as restarted:
        assert restarted.get("/v1/sessions/web").json()["messages"] == exported["messages"]
        assert restarted.delete("/v1/sessions/web-1").json()["deleted"] is True
        ids = {s["id"] for s in restarted.get("/v1/sessions").json()["data"]}
        assert {"web", "copy"} <= ids and "web-1" not in ids
