"""Tool calling over HTTP with the `openai` client: a two-turn conversation (a forced call, the
tool's result sent back as a `role: "tool"` message, the final answer), streaming and not; bad
tool requests are 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from ladle.server import ServerSettings

MODEL = "smol-local:1"
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}
]
QUESTION = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def url(serve: Callable[..., ServerSettings]) -> str:
    return serve().url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _tool_result_turn(call: Any, content: str | None) -> list[dict[str, Any]]:
    """The assistant's call and the tool's answer, as the client sends them back."""
    arguments = json.loads(call.function.arguments)
    assistant = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
    result = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": str(arguments["a"] + arguments["b"]),
    }
    return [assistant, result]


def test_two_turn_tool_call(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=32,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    final = client.chat.completions.create(
        model=MODEL,
        messages=[*QUESTION, *_tool_result_turn(call, choice.message.content)],  # type: ignore[list-item]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        temperature=0,
        max_tokens=12,
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    assert final.usage is not None and final.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_two_turn_tool_call_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=32,
        stream=True,
    )
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                assert not call["name"] and d.function and d.function.name  # id and name first
                call["id"] = d.id
            call["name"] += (d.function and d.function.name) or ""
            call["arguments"] += (d.function and d.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), ADD)
    call = openai.types.chat.ChatCompletionMessageToolCall.model_validate(
        {
            "id": calls[0]["id"],
            "type": "function",
            "function": {k: calls[0][k] for k in ("name", "arguments")},
        }
    )
    pieces = client.chat.completions.create(
        model=MODEL,
        messages=[*QUESTION, *_tool_result_turn(call, None)],  # type: ignore[list-item]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        temperature=0,
        max_tokens=12,
        stream=True,
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": function}


BAD = [
    (_body(tools=[_tool(description="no name")]), "tools[0].function.name"),
    (_body(tools=[_tool(name="f", parameters={"type": "string"})]), "tools[0].function.parameters"),
    (_body(tools=[_tool(name="f", parameters="x")]), "tools[0].function.parameters"),
    (_body(tools=[{"type": "code_interpreter", "function": {"name": "f"}}]), "tools[0].type"),
    (
        _body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "mul"}}),
        "tool_choice.function.name",
    ),
    (_body(tool_choice="required"), "tool_choice"),
    (
        _body(tools=[_tool(name="f", parameters={"type": "object", "required": "a"})]),
        "tools[0].function.parameters",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_tool_requests_are_400s_naming_the_field(
    url: str, body: dict[str, Any], param: str, stream: bool
) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
