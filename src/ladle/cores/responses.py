"""Engine events assembled into OpenAI-shaped responses and stream chunks.

Streaming and non-streaming replies are built from the same `TokenEvent`s by the same
accumulator, so a streamed reply concatenates to exactly the non-streamed one. When a request
offers tools, each choice's text goes through a `ToolCallParser` (tools/parser.py): text outside
calls is the content, each call streams as two deltas (id, type and name, then the arguments),
and a reply that called a tool ends with `finish_reason: "tool_calls"`. A chat reply that
stops is checked against the schemas its grammar did not wholly enforce (`ReplyCheck`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.sequence import TokenEvent
from ladle.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from ladle.tools.parser import ParsedCall, ToolCallParser, ToolParsing, new_call_id

if TYPE_CHECKING:
    from ladle.cores.structured import ReplyCheck

NewPiece = str | tuple[int, ToolCall]  # text, or a call and its index in the reply


@dataclass
class ChoiceState:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    parser: ToolCallParser | None = None  # set when the request offers tools
    content: str = ""  # the text outside tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    new: list[NewPiece] = field(default_factory=list)  # what the latest event added
    schema_violation: str | None = None  # set when the reply stops (ReplyCheck)

    def reported_finish_reason(self) -> str | None:
        if self.finish_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return self.finish_reason

    def message(self) -> AssistantMessage:
        if self.parser is None:
            return AssistantMessage(content=self.text)
        if not self.tool_calls:
            return AssistantMessage(content=self.content)
        return AssistantMessage(content=self.content or None, tool_calls=self.tool_calls)

    def read_tools(self, text: str, is_last: bool) -> None:
        """Run `text` through the parser, keeping the pieces it completes in `new`."""
        assert self.parser is not None
        pieces = self.parser.feed(text) + (self.parser.finish() if is_last else [])
        self.new = [self._keep(piece) for piece in pieces]

    def _keep(self, piece: str | ParsedCall) -> NewPiece:
        if isinstance(piece, str):
            self.content += piece
            return piece
        call = ToolCall(
            id=new_call_id(), function=FunctionCall(name=piece.name, arguments=piece.arguments)
        )
        self.tool_calls.append(call)
        return len(self.tool_calls) - 1, call


class Accumulator:
    """Collects the events of one request's `n` choices."""

    def __init__(
        self,
        n: int,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        tools: ToolParsing | None = None,
        check: ReplyCheck | None = None,
    ) -> None:
        self.choices = [ChoiceState(parser=tools.parser() if tools else None) for _ in range(n)]
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.check = check

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, event: TokenEvent) -> TokenLogprob | None:
        choice = self.choices[event.index]
        choice.text += event.text
        choice.token_ids.append(event.token_id)
        choice.finish_reason = event.finish_reason
        if choice.parser is not None:
            choice.read_tools(event.text, event.finish_reason is not None)
        if event.finish_reason == "stop" and self.check is not None:  # "length": incomplete
            choice.schema_violation = self.check.violation(choice.message())
        if event.logprob is None:
            return None
        entry = TokenLogprob(
            **self._top(event.token_id, event.logprob).model_dump(),
            top_logprobs=[self._top(i, lp) for i, lp in event.top_logprobs],
        )
        choice.logprobs.append(entry)
        return entry

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def usage(self) -> Usage:
        completion = sum(len(c.token_ids) for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def chat_response(
        self, rid: str, created: int, model: str, logprobs: bool
    ) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=c.message(),
                finish_reason=c.reported_finish_reason(),  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs(content=c.logprobs) if logprobs else None,
                schema_violation=c.schema_violation,
            )
            for i, c in enumerate(self.choices)
        ]
        return ChatCompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=self.usage()
        )

    def chat_chunks(
        self, rid: str, created: int, model: str, event: TokenEvent, logprob: TokenLogprob | None
    ) -> list[ChatCompletionChunk]:
        """The chunks that stream what `event` (just `add`ed) adds; the event's logprob rides
        on the first, its finish reason on the last."""
        choice = self.choices[event.index]
        if choice.parser is None:
            deltas = [Delta(content=event.text)] if event.text else []
        else:
            deltas = [d for piece in choice.new for d in _deltas(piece)]
        if not deltas and (event.finish_reason or logprob):
            deltas = [Delta()]
        finish = choice.reported_finish_reason() if event.finish_reason else None
        last = len(deltas) - 1
        return [
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[
                    ChunkChoice(
                        index=event.index,
                        delta=delta,
                        finish_reason=finish if i == last else None,  # type: ignore[arg-type]
                        logprobs=ChoiceLogprobs(content=[logprob]) if logprob and i == 0 else None,
                        schema_violation=choice.schema_violation if finish and i == last else None,
                    )
                ],
            )
            for i, delta in enumerate(deltas)
        ]

    def completion_response(
        self, rid: str, created: int, model: str, logprobs: bool, prefix: str = ""
    ) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=prefix + c.text,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
                logprobs=completion_logprobs(c.logprobs, len(prefix)) if logprobs else None,
            )
            for i, c in enumerate(self.choices)
        ]
        return CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=self.usage()
        )


def _deltas(piece: NewPiece) -> list[Delta]:
    if isinstance(piece, str):
        return [Delta(content=piece)]
    index, call = piece
    opening = ToolCallDelta(
        index=index,
        id=call.id,
        type="function",
        function=FunctionCallDelta(name=call.function.name, arguments=""),
    )
    arguments = ToolCallDelta(
        index=index, function=FunctionCallDelta(arguments=call.function.arguments)
    )
    return [Delta(tool_calls=[opening]), Delta(tool_calls=[arguments])]


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


def completion_chunk(
    rid: str, created: int, model: str, event: TokenEvent, logprob: TokenLogprob | None
) -> CompletionResponse:
    choice = CompletionChoice(
        index=event.index,
        text=event.text,
        finish_reason=event.finish_reason,  # type: ignore[arg-type]
        logprobs=completion_logprobs([logprob]) if logprob else None,
    )
    return CompletionResponse(id=rid, created=created, model=model, choices=[choice])
