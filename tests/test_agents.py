"""The agent runtime in the SDK, on the real SmolLM2: tool callbacks run by the loop, files
they make, sessions (continue, fork, export/import, persist, concurrent turns), bad input.

SmolLM2 makes deterministic calls when `tool_choice` names the tool, so each loop below runs
call -> callback -> answer on the real model. One model with callbacks and one without serve
the module.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ladle import (
    InvalidRequestError,
    McpClientConfig,
    McpServerConfig,
    Model,
    NotFoundError,
    TextModelBuilder,
    ToolFile,
    tool,
)
from ladle.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    FunctionCall,
    ToolCall,
    Usage,
)
from ladle.tools.callbacks import tool_callback
from ladle.tools.runtime import AgentRun, Toolbox

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
RELEASE_NAP = threading.Event()  # set at teardown: the hanging tool's thread then ends


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"Sunny, 23 C in {city}"


class Order(BaseModel):
    item: str
    quantity: int


@tool
async def place_order(order: Order) -> dict[str, Any]:
    """Place an order for an item."""
    return {"ordered": order.item, "quantity": order.quantity, "status": "confirmed"}


def explode() -> str:
    """Always fails."""
    raise RuntimeError("boom")


def nap() -> str:
    """Hangs until the test ends."""
    RELEASE_NAP.wait(60)
    return "woke"


def chart(title: str) -> ToolFile:
    """Draw a chart."""
    return ToolFile(f"{title}.png", "image/png", PNG)


def report(topic: str) -> str:
    """A long report."""
    return f"Report on {topic}. " + "lorem ipsum " * 1000


def _forced(name: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": text}],
        "tool_choice": {"type": "function", "function": {"name": name}},
        "temperature": 0,
        "max_tokens": 40,
        **extra,
    }


@pytest.fixture(scope="module")
def agent(smollm2_path: Path) -> Iterator[Model]:
    model = (
        TextModelBuilder(smollm2_path)
        .with_tool_callback(get_weather)
        .with_tool_callback(place_order)
        .with_tool_callback("explode", explode)
        .with_tool_callback("nap", nap)
        .with_tool_callback("chart", chart)
        .with_tool_callback(
            "report",
            report,
            description="Write a report",
            parameters={"type": "object", "properties": {"topic": {"type": "string"}}},
        )
        .with_tool_timeout_secs(0.5)
        .build()
    )
    yield model
    RELEASE_NAP.set()
    model.close()


@pytest.fixture(scope="module")
def plain(smollm2_path: Path) -> Iterator[Model]:
    with TextModelBuilder(smollm2_path).build() as model:
        yield model


# ---- tool callbacks


def test_the_schema_comes_from_type_hints_and_the_docstring() -> None:
    assert get_weather.description == "Get the current weather in a city."
    assert get_weather.parameters == {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    order = place_order.parameters
    assert order["required"] == ["order"] and "$defs" in order  # a pydantic model argument
    with pytest.raises(InvalidRequestError, match="name"):
        tool_callback("bad name!", explode)


def test_a_forced_callback_runs_and_the_model_answers_from_its_result(agent: Model) -> None:
    reply = agent.send_chat_request(_forced("get_weather", "What is the weather in Paris?"))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "23" in (choice.message.content or "")  # read from the tool's result
    events = reply.agent_events or []
    assert [e.type for e in events] == ["tool_call.started", "tool_call.finished"]
    assert events[0].name == "get_weather" and json.loads(events[0].arguments or "") == {
        "city": "Paris"
    }
    assert events[1].output == "Sunny, 23 C in Paris"
    # two rounds' tokens: the call, then the answer over a longer prompt
    one_round = agent.send_chat_request(
        {**_forced("get_weather", "What is the weather in Paris?"), "max_tool_rounds": 0}
    )
    assert reply.usage.prompt_tokens > 2 * one_round.usage.prompt_tokens - 10


def test_arguments_are_validated_against_a_pydantic_model(agent: Model) -> None:
    request = _forced("place_order", "Order 3 apples.", max_tokens=60, max_tool_rounds=1)
    reply = agent.send_chat_request(request)
    finished = [e for e in reply.agent_events or [] if e.type != "tool_call.started"]
    assert len(finished) == 1
    if finished[0].type == "tool_call.finished":  # the model's arguments fit the schema
        assert json.loads(finished[0].output or "")["status"] == "confirmed"
    else:  # they did not: the model is told which field, and the request still answers
        assert "invalid arguments for place_order" in (finished[0].output or "")
    assert reply.choices[0].finish_reason == "stop"


def test_a_tool_that_raises_or_hangs_gives_the_model_an_error_not_a_failure(
    agent: Model,
) -> None:
    for name, expected in (("explode", "RuntimeError: boom"), ("nap", "timed out after 0.5")):
        reply = agent.send_chat_request({**_forced(name, "Go."), "max_tool_rounds": 1})
        events = reply.agent_events or []
        assert [e.type for e in events] == ["tool_call.started", "tool_call.failed"]
        assert events[-1].type == "tool_call.failed" and expected in (events[-1].output or "")
        assert reply.choices[0].finish_reason in ("stop", "length")
    after = agent.send_chat_request(_forced("get_weather", "Weather in Rome?"))
    assert (after.agent_events or [])[-1].type == "tool_call.finished"  # still serving


def test_files_a_tool_makes_are_kept_and_the_model_sees_a_note(agent: Model) -> None:
    reply = agent.send_chat_request(_forced("chart", "Draw a chart of sales."))
    created = [e for e in reply.agent_events or [] if e.type == "file.created"]
    assert len(created) == 1 and created[0].file is not None
    ref = created[0].file
    assert ref.media_type == "image/png" and ref.bytes == len(PNG) and ref.id.startswith("file-")
    found = agent.find_file(ref.id)
    assert found.data == PNG and found.name == ref.filename
    finished = [e for e in reply.agent_events or [] if e.type == "tool_call.finished"]
    assert finished[0].output == found.describe()  # the note, not the bytes
    with pytest.raises(NotFoundError, match="file-nope"):
        agent.find_file("file-nope")


def test_a_long_result_is_previewed_and_kept_whole(agent: Model) -> None:
    reply = agent.send_chat_request(_forced("report", "Write a report about tea."))
    finished = next(e for e in reply.agent_events or [] if e.type == "tool_call.finished")
    created = next(e for e in reply.agent_events or [] if e.type == "file.created")
    assert created.file is not None and created.file.id in (finished.output or "")
    assert len(finished.output or "") < 1200
    whole = agent.find_file(created.file.id).data.decode()
    assert whole.startswith("Report on") and len(whole) > 10000


def test_client_tools_return_to_the_client_and_win_a_name_clash(agent: Model) -> None:
    own = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The client's own weather tool.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    reply = agent.send_chat_request(_forced("get_weather", "Weather in Lima?", tools=[own]))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not reply.agent_events
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == (
        "get_weather"
    )


def test_a_streamed_loop_reports_progress_then_the_answer(agent: Model) -> None:
    chunks = list(
        agent.stream_chat_request(
            _forced("get_weather", "What is the weather in Paris?", stream_options={
                "include_usage": True
            })
        )
    )  # fmt: skip
    events = [c.agent_event for c in chunks if c.agent_event is not None]
    assert [e.type for e in events] == ["tool_call.started", "tool_call.finished"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "23" in text
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]  # one finish: the answer's
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 5
    whole = agent.send_chat_request(_forced("get_weather", "What is the weather in Paris?"))
    assert whole.choices[0].message.content == text  # greedy: the same answer


def test_max_tool_rounds_and_n(agent: Model) -> None:
    reply = agent.send_chat_request({**_forced("get_weather", "Weather?"), "max_tool_rounds": 0})
    assert not reply.agent_events  # no round may run a tool: the first is `none`
    with pytest.raises(InvalidRequestError) as e:
        agent.send_chat_request({**_forced("get_weather", "Weather?"), "n": 2})
    assert e.value.param == "n"
    with pytest.raises(InvalidRequestError) as e:
        agent.send_chat_request(_forced("no_such_tool", "Hi"))
    assert e.value.param == "tool_choice.function.name"


# ---- sessions


def test_a_session_continues_with_only_the_new_turn(plain: Model) -> None:
    first = plain.send_chat_request("My name is Ada. Say hi.", session_id="intro")
    second = plain.send_chat_request("What is my name?", session_id="intro")
    stored = json.loads(plain.export_session("intro"))["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["content"] == first.choices[0].message.content
    assert stored[3]["content"] == second.choices[0].message.content
    whole = plain.tokenize(stored[:3])
    assert second.usage.prompt_tokens == len(whole)  # the history went in front
    assert second.session_id == "intro" and "intro" in plain.list_session_ids()


def test_fork_export_import_and_delete(plain: Model, smollm2_path: Path) -> None:
    plain.send_chat_request("Count to three.", session_id="src")
    plain.send_chat_request("Now to five.", session_id="src")
    plain.fork_session("src", "one-turn", num_turns=1)
    plain.fork_session("src", "all")
    assert len(json.loads(plain.export_session("one-turn"))["messages"]) == 2
    assert len(json.loads(plain.export_session("all"))["messages"]) == 4
    with pytest.raises(InvalidRequestError, match="already exists"):
        plain.fork_session("src", "all")
    exported = plain.export_session("src")
    with TextModelBuilder(smollm2_path).build() as other:  # another store, as another process
        assert other.import_session(exported) == "src"
        assert (
            json.loads(other.export_session("src"))["messages"] == json.loads(exported)["messages"]
        )
        reply = other.send_chat_request("And to six?", session_id="src")
        assert reply.usage.prompt_tokens > len(other.tokenize("And to six?"))
    plain.delete_session("all")
    assert "all" not in plain.list_session_ids()
    for call in (
        lambda: plain.delete_session("all"),
        lambda: plain.export_session("nobody"),
        lambda: plain.fork_session("nobody", "x"),
    ):
        with pytest.raises(NotFoundError):
            call()


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ("{not json", "session"),
        ({"id": "bad id!", "messages": []}, "id"),
        ({"id": "ok", "messages": "hi"}, "messages"),
        ({"id": "ok", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"id": "ok", "messages": [], "files": [{"id": "f"}]}, "files[0]"),
        ({"id": "ok", "messages": [], "files": [{"id": "f", "filename": "a", "media_type":
          "text/plain", "data": "%%%"}]}, "files[0]"),
    ],
)  # fmt: skip
def test_a_malformed_import_names_the_field_and_changes_nothing(
    plain: Model, data: Any, param: str
) -> None:
    plain.import_session({"id": "ok", "messages": [{"role": "user", "content": "kept"}]})
    before = plain.export_session("ok")
    with pytest.raises(InvalidRequestError) as e:
        plain.import_session(data)
    assert e.value.param == param
    assert plain.export_session("ok") == before


def test_concurrent_requests_to_one_session_take_turns(plain: Model) -> None:
    words = ["apple", "river", "cloud", "stone"]
    replies: dict[str, str] = {}

    def ask(word: str) -> None:
        reply = plain.send_chat_request(
            {"messages": [{"role": "user", "content": f"Repeat: {word}"}], "max_tokens": 8},
            session_id="busy",
        )
        replies[word] = reply.choices[0].message.content or ""

    threads = [threading.Thread(target=ask, args=(w,)) for w in words]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = json.loads(plain.export_session("busy"))["messages"]
    assert len(stored) == 8
    for user, answer in zip(stored[::2], stored[1::2], strict=True):
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert answer["content"] == replies[user["content"].removeprefix("Repeat: ")]


def test_sessions_persist_in_their_file(smollm2_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    with TextModelBuilder(smollm2_path).with_sessions(db).build() as first:
        first.send_chat_request("Remember the number 7.", session_id="kept")
    with TextModelBuilder(smollm2_path).with_sessions(db).build() as second:
        assert second.list_session_ids() == ["kept"]
        stored = json.loads(second.export_session("kept"))["messages"]
        assert stored[0]["content"] == "Remember the number 7."


def test_the_store_keeps_within_its_limits(smollm2_path: Path) -> None:
    with TextModelBuilder(smollm2_path).with_sessions(max_sessions=2).build() as model:
        for sid in ("a", "b", "c"):
            model.import_session({"id": sid, "messages": [{"role": "user", "content": sid}]})
        assert sorted(model.list_session_ids()) == ["b", "c"]  # the least recent went


def test_async_model_runs_the_same_loop_and_takes_turns(smollm2_path: Path) -> None:
    words = ["apple", "river", "cloud"]

    async def run() -> tuple[str, list[str], list[str], list[str], list[dict[str, Any]]]:
        builder = TextModelBuilder(smollm2_path).with_tool_callback(get_weather)
        async with await builder.build_async() as model:
            request = _forced("get_weather", "What is the weather in Paris?")
            reply = await model.send_chat_request(request, session_id="a1")
            kinds = [
                c.agent_event.type
                async for c in model.stream_chat_request(request, session_id="a1")
                if c.agent_event is not None
            ]
            asks = [
                {"messages": [{"role": "user", "content": f"Repeat: {w}"}], "max_tokens": 8,
                 "tool_choice": "none"}
                for w in words
            ]  # fmt: skip
            replies = await asyncio.gather(
                *(model.send_chat_request(a, session_id="a2") for a in asks)
            )
            stored = json.loads(await model.export_session("a2"))["messages"]
            return (
                reply.choices[0].message.content or "",
                kinds,
                await model.list_session_ids(),
                [r.choices[0].message.content or "" for r in replies],
                stored,
            )

    text, kinds, ids, replies, stored = asyncio.run(run())
    assert "23" in text
    assert kinds == ["tool_call.started", "tool_call.finished"]
    assert sorted(ids) == ["a1", "a2"]
    answers = dict(zip(words, replies, strict=True))
    assert len(stored) == 6  # three whole turns, none interleaved
    for user, answer in zip(stored[::2], stored[1::2], strict=True):
        assert answer["content"] == answers[user["content"].removeprefix("Repeat: ")]


# ---- MCP, wired in with one builder call


def test_an_mcp_server_over_stdio_serves_the_loop(smollm2_path: Path) -> None:
    server = McpServerConfig(
        "local", sys.executable, (str(Path(__file__).parent / "mcp_servers" / "stdio_server.py"),)
    )
    config = McpClientConfig([server])
    with TextModelBuilder(smollm2_path).with_mcp_client(config).build() as model:
        names = dict(model.list_mcp_tools())
        assert {"add", "weather", "sleep", "crash"} <= set(names) and names["add"]
        reply = model.send_chat_request(_forced("add", "Add 2 and 3.", max_tool_rounds=1))
        events = reply.agent_events or []
        assert [e.type for e in events] == ["tool_call.started", "tool_call.finished"]
        assert events[1].output == "5"

        crashed = model.send_chat_request({**_forced("crash", "Crash."), "max_tool_rounds": 1})
        failed = (crashed.agent_events or [])[-1]
        assert failed.type == "tool_call.failed" and "crash" in (failed.output or "")
        assert "local" in model.toolbox.mcp_failures()  # the server is gone, and named
        after = model.send_chat_request({"messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 5})  # fmt: skip
        assert after.choices[0].message.content  # still serving, without the dead tools
        assert "add" not in model.toolbox.tools()


# ---- the loop's rules, on replies written by hand


def _reply(*calls: tuple[str, str]) -> ChatCompletionResponse:
    tool_calls = [
        ToolCall(id=f"call_{i}", function=FunctionCall(name=name, arguments=arguments))
        for i, (name, arguments) in enumerate(calls)
    ]
    message = AssistantMessage(content=None, tool_calls=tool_calls or None)
    choice = ChatChoice(index=0, message=message, finish_reason="tool_calls")
    usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    return ChatCompletionResponse(id="r", created=0, model="m", choices=[choice], usage=usage)


def test_a_round_that_also_calls_a_client_tool_runs_the_server_call_and_ends() -> None:
    toolbox = Toolbox([get_weather])
    toolbox.start()
    try:
        own = {"type": "function", "function": {"name": "book_hotel", "parameters": {}}}
        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "Plan Paris."}], "tools": [own],
             "session_id": "mixed"}
        )  # fmt: skip
        run = AgentRun(req, toolbox)
        offered = [t.function.name for t in run.request().tools or []]
        assert offered == ["book_hotel", "get_weather"]  # the client's, then the server's
        reply = _reply(("get_weather", '{"city": "Paris"}'), ("book_hotel", "{}"))
        calls = run.take(reply)
        assert [c.function.name for _, c in calls] == ["get_weather"] and run.done
        run.record(calls, toolbox.run_calls(calls).result())
        final = run.finish(reply)
        message = final.choices[0].message
        assert [c.function.name for c in message.tool_calls or []] == ["book_hotel"]
        assert final.choices[0].finish_reason == "tool_calls"
        assert final.usage.total_tokens == 15  # one round
        stored = toolbox.sessions.history("mixed")
        assert [m["role"] for m in stored] == ["user", "assistant", "tool"]
        assert len(stored[1]["tool_calls"]) == 2  # the client answers book_hotel next turn
        assert stored[2]["content"] == "Sunny, 23 C in Paris"
    finally:
        toolbox.close()


def test_the_last_allowed_round_offers_no_call() -> None:
    toolbox = Toolbox([get_weather])
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required",
         "max_tool_rounds": 1}
    )  # fmt: skip
    run = AgentRun(req, toolbox)
    assert run.request().tool_choice == "required"  # the first round, as asked
    run.take(_reply(("get_weather", '{"city": "Oslo"}')))
    run.record([], [])
    assert run.request().tool_choice == "none"
    toolbox.close()
