"""The agentic loop, without the waiting: what each round asks the model, which calls ladle runs.

A request whose model has server-side tools (callbacks, MCP), or that names a `session_id`,
runs in rounds: generate -> read tool calls (the parser that exists) -> run the calls that
ladle implements, concurrently -> append the results as `tool` messages -> generate again,
up to `max_tool_rounds`. `AgentRun` holds the rules of one such request and does no I/O, so
`Model` (blocking) and `AsyncModel` (asyncio) drive the same loop with their own waiting, as
they do for a plain request. `Toolbox` holds what outlives a request: the tools, the event
loop they run on, the session and file stores.

Rules beyond mistral.rs's:
- The request's own tools win a name clash with a server tool; calls to them go back to the
  client as `tool_calls`, as without server tools. A round that calls both kinds runs the
  server's calls and returns only the client's.
- `tool_choice` (`required`, a named tool, `none`) applies to the first round; later rounds
  are `auto`, and the last allowed round is `none`, so the loop ends with an answer.
- A tool that raises, times out or whose server died gives the model an error text as its
  result; the request does not fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from ladle.errors import InvalidRequestError, NotFoundError
from ladle.protocol.openai import (
    AgentEvent,
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChunkChoice,
    Delta,
    FileRef,
    FunctionCallDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ladle.tools.callbacks import ServerTool, ToolFile, ToolOutput
from ladle.tools.database import Database
from ladle.tools.files import FileStore, StoredFile, preview
from ladle.tools.mcp import McpClientConfig, McpClients
from ladle.tools.sessions import SessionLimits, SessionStore, check_session_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOOL_ROUNDS = 8
DEFAULT_TOOL_TIMEOUT_SECS = 60.0
DEFAULT_MAX_CONCURRENT_CALLS = 8

T = TypeVar("T")


class Toolbox:
    """Server-side tools, sessions and files of one `Model` (or of one `ladle serve`, shared
    by all its models). Tools run on a loop thread of their own: MCP sessions are bound to
    the event loop that opened them, and a blocking `Model` has none."""

    def __init__(
        self,
        callbacks: list[ServerTool] | None = None,
        mcp: McpClientConfig | None = None,
        *,
        db_path: Any = None,
        session_limits: SessionLimits | None = None,
        max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
        tool_timeout_secs: float | None = DEFAULT_TOOL_TIMEOUT_SECS,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    ) -> None:
        names = [t.name for t in callbacks or []]
        if len(set(names)) != len(names):
            raise InvalidRequestError("two tool callbacks share a name", param="name")
        self.callbacks = {t.name: t for t in callbacks or []}
        self.mcp_config = mcp
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout_secs = tool_timeout_secs
        self.max_concurrent_calls = max_concurrent_calls
        self.db = Database(db_path)
        self.sessions = SessionStore(self.db, session_limits)
        self.files = FileStore(self.db)
        self._mcp: McpClients | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None

    # ---- life

    def start(self) -> None:
        """Start the tool loop and connect the MCP servers (blocking until each is up or has
        failed; a failed server is logged and left out)."""
        if self._loop is not None or not (self.callbacks or self.mcp_config):
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="ladle-tools", daemon=True)
        self._thread.start()
        self._loop = loop
        self._slots = asyncio.Semaphore(self.max_concurrent_calls)
        if self.mcp_config is not None:
            self._mcp = McpClients(self.mcp_config)
            self.submit(self._mcp.start()).result()

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            if self._mcp is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._mcp.aclose(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
        self.db.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        assert self._loop is not None, "Toolbox.start() was not called"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    # ---- tools

    def tools(self) -> dict[str, ServerTool]:
        """The tools offered to the model: callbacks, then MCP tools (a callback wins a
        clash: its owner chose the name)."""
        found = dict(self.callbacks)
        if self._mcp is not None and self._mcp.config.auto_register_tools:
            for t in self._mcp.tools():
                found.setdefault(t.name, t)
        return found

    def list_mcp_tools(self) -> list[tuple[str, str]]:
        return self._mcp.list_tools() if self._mcp is not None else []

    def mcp_failures(self) -> dict[str, str]:
        return dict(self._mcp.failures) if self._mcp is not None else {}

    def engaged(self, req: ChatCompletionRequest) -> bool:
        """Whether `req` runs through the agent loop (else it is one plain generation)."""
        return req.session_id is not None or bool(self.tools())

    def run_calls(self, calls: list[tuple[ServerTool, ToolCall]]) -> Future[list[ToolOutput]]:
        """Run the calls concurrently on the tool loop; results in the calls' order."""
        return self.submit(self._run_all(calls))

    async def _run_all(self, calls: list[tuple[ServerTool, ToolCall]]) -> list[ToolOutput]:
        return list(await asyncio.gather(*(self._run_one(t, c) for t, c in calls)))

    async def _run_one(self, server_tool: ServerTool, call: ToolCall) -> ToolOutput:
        name = call.function.name
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError as e:
            return ToolOutput(f"tool {name}: arguments are not JSON: {e}", (), True)
        if not isinstance(arguments, dict):
            return ToolOutput(f"tool {name}: arguments must be a JSON object", (), True)
        if server_tool.source != "callback":  # MCP: its client bounds time and concurrency
            return await server_tool.run(arguments)
        assert self._slots is not None
        async with self._slots:
            try:
                return await asyncio.wait_for(server_tool.run(arguments), self.tool_timeout_secs)
            except TimeoutError:
                return ToolOutput(
                    f"tool {name} timed out after {self.tool_timeout_secs} s", (), True
                )
            except Exception as e:  # the model reads it as the tool's result
                logger.info("tool %s raised %r", name, e)
                return ToolOutput(f"tool {name} failed: {type(e).__name__}: {e}", (), True)

    # ---- sessions

    @contextlib.contextmanager
    def holding(self, session_id: str | None) -> Iterator[None]:
        """Hold a session's lock (blocking callers)."""
        if session_id is None:
            yield
            return
        with self.sessions.lock(check_session_id(session_id)):
            yield

    @contextlib.asynccontextmanager
    async def holding_async(self, session_id: str | None) -> AsyncIterator[None]:
        """Hold a session's lock without blocking the event loop (polled: the lock is shared
        with blocking callers, and a cancelled waiter must not leave it taken)."""
        if session_id is None:
            yield
            return
        lock = self.sessions.lock(check_session_id(session_id))
        while not lock.acquire(blocking=False):
            await asyncio.sleep(0.005)
        try:
            yield
        finally:
            lock.release()

    def find_file(self, file_id: str) -> StoredFile:
        found = self.files.get(file_id)
        if found is None:
            raise NotFoundError("file", file_id)
        return found


class AgentRun:
    """One request through the loop: call `request()`, generate, `take(response)`; run the
    calls it returns and `record` their outputs; repeat until `done`; then `finish` with the
    last response. Call it holding the session's lock (`Toolbox.holding`)."""

    def __init__(self, req: ChatCompletionRequest, toolbox: Toolbox) -> None:
        if req.n != 1:
            raise InvalidRequestError(
                "n must be 1 when a request uses sessions or server-side tools", param="n"
            )
        self.req = req
        self.toolbox = toolbox
        client = {t.function.name for t in req.tools or []}
        self.server = {k: v for k, v in toolbox.tools().items() if k not in client}
        self.max_rounds = (
            req.max_tool_rounds if req.max_tool_rounds is not None else toolbox.max_tool_rounds
        )
        history = toolbox.sessions.history(req.session_id) if req.session_id else []
        self.history = [ChatMessage.model_validate(m) for m in history]
        self.added = list(req.messages)  # what this request adds to the session
        self.round = 0
        self.pending = AssistantMessage(content=None)  # the round's reply, while its calls run
        self.done = False  # the last reply answers, or calls a client's tool
        self.recorded = False  # `record` stored the last reply (its server calls ran)
        self.events: list[AgentEvent] = []
        self.usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)

    def request(self) -> ChatCompletionRequest:
        """What the model is asked in this round."""
        offered = [Tool.model_validate(t.definition()) for t in self.server.values()]
        tools = [*(self.req.tools or []), *offered] or None
        choice = self.req.tool_choice
        if self.round > 0:
            choice = "auto"
        if self.round >= self.max_rounds and self.server:
            choice = "none"
        if tools is None and choice == "auto":
            choice = None
        return self.req.model_copy(
            update={
                "messages": self.history + self.added,
                "tools": tools,
                "tool_choice": choice,
                "session_id": None,
                "stream": False,
            }
        )

    def take(self, response: ChatCompletionResponse) -> list[tuple[ServerTool, ToolCall]]:
        """Count the round's tokens; the server-side calls to run now. The loop is `done`
        when there are none, or when the reply also calls a client's tool: the client must
        answer that before the model can go on."""
        self.usage = _add(self.usage, response.usage)
        message = response.choices[0].message
        called = message.tool_calls or []
        calls = [
            (self.server[c.function.name], c) for c in called if c.function.name in self.server
        ]
        self.done = len(calls) < len(called) or not calls
        for _, call in calls:
            self.events.append(self._event("tool_call.started", call))
        self.pending, self.recorded = message, False
        return calls

    def record(
        self, calls: list[tuple[ServerTool, ToolCall]], outputs: list[ToolOutput]
    ) -> list[AgentEvent]:
        """Append the round's assistant message (all its calls: a client's too, whose result
        the client sends next) and the tools' results; the events made."""
        made: list[AgentEvent] = []
        self.added.append(_stored(self.pending))
        self.recorded = True
        for (_, call), output in zip(calls, outputs, strict=True):
            text, notes = self._result_text(output)
            made.extend(self._file_event(call, stored) for stored in notes)
            kind = "tool_call.failed" if output.is_error else "tool_call.finished"
            made.append(self._event(kind, call, output=text))
            self.added.append(
                ChatMessage(
                    role="tool", content=text, tool_call_id=call.id, name=call.function.name
                )
            )
        self.events.extend(made)
        self.round += 1
        return made

    def finish(self, response: ChatCompletionResponse) -> ChatCompletionResponse:
        """The final response: only the client's calls (a mixed round's server calls ran),
        every round's tokens; the exchange stored in the session."""
        choice = response.choices[0]
        message = choice.message
        if self.recorded:  # `record` stored this reply already, with the tools' results after it
            own = [c for c in message.tool_calls or [] if c.function.name not in self.server]
            message = AssistantMessage(content=message.content, tool_calls=own)
            choice = choice.model_copy(update={"message": message, "finish_reason": "tool_calls"})
        if self.req.session_id is not None:
            added = self.added if self.recorded else [*self.added, _stored(message)]
            self.toolbox.sessions.append(
                self.req.session_id, [m.model_dump(exclude_none=True) for m in added]
            )
        return response.model_copy(
            update={
                "choices": [choice],
                "usage": self.usage,
                "session_id": self.req.session_id,
                "agent_events": self.events or None,
            }
        )

    def final_chunks(
        self, response: ChatCompletionResponse, rid: str, created: int, model: str
    ) -> list[ChatCompletionChunk]:
        """A stream's closing chunks: the client's tool calls (held back while the round ran)
        and the finish reason."""
        choice = self.finish(response).choices[0]
        deltas = [
            Delta(
                tool_calls=[
                    ToolCallDelta(
                        index=i,
                        id=c.id,
                        type="function",
                        function=FunctionCallDelta(
                            name=c.function.name, arguments=c.function.arguments
                        ),
                    )
                ]
            )
            for i, c in enumerate(choice.message.tool_calls or [])
        ] + [Delta()]
        return [
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[
                    ChunkChoice(
                        index=0,
                        delta=d,
                        finish_reason=choice.finish_reason if i == len(deltas) - 1 else None,
                        schema_violation=choice.schema_violation if i == len(deltas) - 1 else None,
                    )
                ],
            )
            for i, d in enumerate(deltas)
        ]

    @staticmethod
    def passes(chunk: ChatCompletionChunk) -> ChatCompletionChunk | None:
        """A round's chunk as the client gets it mid-loop: text and logprobs go on; tool-call
        deltas and the finish reason wait for the end of the round (`final_chunks`)."""
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None or (choice.delta.tool_calls is None and choice.finish_reason is None):
            return chunk
        if choice.delta.content or choice.logprobs:
            delta = Delta(content=choice.delta.content)
            kept = ChunkChoice(index=0, delta=delta, logprobs=choice.logprobs)
            return chunk.model_copy(update={"choices": [kept]})
        return None

    def event_chunks(
        self, events: list[AgentEvent], rid: str, created: int, model: str
    ) -> list[ChatCompletionChunk]:
        return [
            ChatCompletionChunk(id=rid, created=created, model=model, choices=[], agent_event=e)
            for e in events
        ]

    def started_events(self) -> list[AgentEvent]:
        """The `started` events of the calls `take` just returned."""
        return [e for e in self.events if e.round == self.round and e.type == "tool_call.started"]

    # ---- inside

    def _result_text(self, output: ToolOutput) -> tuple[str, list[StoredFile]]:
        """What the model reads of a tool's output, and the files stored from it."""
        session = self.req.session_id
        shown, cut = preview(output.text)
        stored: list[StoredFile] = []
        if cut:
            whole = ToolFile("tool-result.txt", "text/plain", output.text.encode())
            stored.append(self.toolbox.files.add(whole, session))
            shown += f"\n... [{len(output.text)} characters in all: {stored[-1].id}]"
        for file in output.files:
            stored.append(self.toolbox.files.add(file, session))
            shown += ("\n" if shown else "") + stored[-1].describe()
        if output.is_error and not shown.startswith("error"):
            shown = f"error: {shown}"
        return shown, stored

    def _event(self, kind: Any, call: ToolCall, output: str | None = None) -> AgentEvent:
        return AgentEvent(
            type=kind,
            round=self.round,
            call_id=call.id,
            name=call.function.name,
            arguments=call.function.arguments if kind == "tool_call.started" else None,
            output=output,
        )

    def _file_event(self, call: ToolCall, f: StoredFile) -> AgentEvent:
        ref = FileRef(id=f.id, filename=f.name, media_type=f.media_type, bytes=f.size)
        return AgentEvent(
            type="file.created",
            round=self.round,
            call_id=call.id,
            name=call.function.name,
            file=ref,
        )


def _stored(message: AssistantMessage) -> ChatMessage:
    """A reply as the session keeps it (and the next round's prompt shows it)."""
    calls = [c.model_dump() for c in message.tool_calls or []]
    return ChatMessage(role="assistant", content=message.content, tool_calls=calls or None)


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
    )
