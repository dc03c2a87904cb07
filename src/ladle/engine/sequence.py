"""One generated choice: its tokens, its KV blocks, its sampler, and how it ends."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ladle.engine.loading.tokenizer import IncrementalDecoder, Tokenizer
from ladle.engine.sampling import Sampler, SamplingParams, top_logprobs
from ladle.engine.stop_strings import StopStringMatcher


@dataclass(slots=True)
class TokenEvent:
    """What a sequence emits for each generated token (text may be empty while held back)."""

    index: int  # choice index within its request
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sink(Protocol):
    """Where a request's events go: a thread queue, or an asyncio queue fed thread-safely."""

    def put(self, event: TokenEvent) -> None: ...

    def fail(self, error: BaseException) -> None: ...


_ids = itertools.count()


class Sequence:
    def __init__(
        self,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        tokenizer: Tokenizer,
        stop_token_ids: set[int],
        sink: Sink,
        continues_prompt: bool = False,
    ) -> None:
        self.seq_id = next(_ids)
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.token_ids = list(prompt_ids)  # prompt then output: what the KV cache holds
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        # KV blocks (block_manager.py) and how far the model has computed this sequence
        self.block_table: list[int] = []
        self.contiguous = True
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0
        self.parent: Sequence | None = None  # another choice of the request whose prefill it reuses
        self.sink = sink
        seed = None if params.seed is None else params.seed + index
        self.sampler = Sampler(params, prompt_ids, seed)
        self.stop_token_ids = stop_token_ids
        # a completion continues its prompt's text ("is" + " Paris"); a chat reply starts fresh
        context = prompt_ids if continues_prompt else ()
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True, prompt_ids=context)
        self.stop_matcher = StopStringMatcher(params.stop)
        self.grammar = params.grammar.matcher() if params.grammar else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefilled(self) -> bool:
        return bool(self.output_ids) or self.status is SequenceStatus.FINISHED

    def append_from_logits(self, logits: torch.Tensor) -> TokenEvent:
        """Sample the next token from a `[vocab]` row, update state; returns its event.

        The row is the caller's to give away: sampling changes it in place. The caller puts
        the event in `self.sink` (the engine does, once the whole step is sampled).
        """
        raw = logits.clone() if self.params.logprobs else None  # of the unbiased row
        token_id = self._pick(logits)
        self.sampler.record(token_id)
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)
        event = TokenEvent(self.index, token_id, "")
        if raw is not None:
            event.logprob, event.top_logprobs = top_logprobs(
                raw, token_id, self.params.top_logprobs
            )
        if token_id in self.stop_token_ids and not self.params.ignore_eos:
            event.text = self.stop_matcher.push(self.decoder.flush()) + self.stop_matcher.flush()
            self._finish(event, "stop")
        elif self.grammar is not None and self.grammar.is_done:
            # the constrained text is whole (and has no stop strings): no end token needed
            event.text = self.decoder.push(token_id) + self.decoder.flush()
            self._finish(event, "stop")
        else:
            event.text = self.stop_matcher.push(self.decoder.push(token_id))
            if self.stop_matcher.stopped:
                self._finish(event, "stop")
            elif len(self.output_ids) >= self.max_tokens:
                tail = self.stop_matcher.push(self.decoder.flush())
                event.text += tail + self.stop_matcher.flush()
                self._finish(event, "stop" if self.stop_matcher.stopped else "length")
        return event

    def _pick(self, logits: torch.Tensor) -> int:
        """Draw a token; under a constraint, mask and draw again only if the grammar forbids it."""
        processed = self.sampler.process(logits)
        token_id = self.sampler.sample(processed)
        if self.grammar is None:
            return token_id
        if not self.grammar.allows(token_id):
            self.grammar.mask(processed)
            token_id = self.sampler.sample(processed)
        self.grammar.consume(token_id)
        return token_id

    def _finish(self, event: TokenEvent, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = event.finish_reason = reason
