"""Engine events assembled into OpenAI-shaped responses and stream chunks.

Streaming and non-streaming replies are built from the same `TokenEvent`s by the same
accumulator, so a streamed reply concatenates to exactly the non-streamed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.sequence import TokenEvent
from ladle.protocol import (
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
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class ChoiceState:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Accumulator:
    """Collects the events of one request's `n` choices."""

    def __init__(self, n: int, tokenizer: Tokenizer, prompt_tokens: int) -> None:
        self.choices = [ChoiceState() for _ in range(n)]
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, event: TokenEvent) -> TokenLogprob | None:
        choice = self.choices[event.index]
        choice.text += event.text
        choice.token_ids.append(event.token_id)
        choice.finish_reason = event.finish_reason
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
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs(content=c.logprobs) if logprobs else None,
            )
            for i, c in enumerate(self.choices)
        ]
        return ChatCompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=self.usage()
        )

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


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    event: TokenEvent,
    logprob: TokenLogprob | None,
) -> ChatCompletionChunk:
    choice = ChunkChoice(
        index=event.index,
        delta=Delta(content=event.text) if event.text else Delta(),
        finish_reason=event.finish_reason,  # type: ignore[arg-type]
        logprobs=ChoiceLogprobs(content=[logprob]) if logprob else None,
    )
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])


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
