"""From a row of logits to the next token: penalties, bias, filters, then a seeded draw.

The order follows the common practice of llama.cpp and vLLM: penalties and logit bias act on
raw logits; temperature scales them; top-k, top-p and min-p cut the tail; the token is drawn
with the sequence's own `torch.Generator`, so one seed always gives one text. Log-probabilities
reported to the user are those of the model itself (log-softmax of the raw logits).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ladle.engine.grammar import CompiledGrammar
from ladle.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How one sequence picks its tokens; `temperature == 0` means greedy."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    truncate_sequence: bool = False
    grammar: CompiledGrammar | None = None  # output constrained to it (grammar.py)

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0"),
            (0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]"),
            (self.n >= 1, "n", "must be >= 1"),
            # a stop string could cut a constrained text short and still report "stop"
            (not (self.stop and self.grammar), "stop", "cannot be combined with a constraint"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidRequestError(f"{message}, got {getattr(self, name)!r}", param=name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Per-sequence sampling state: the generator and the counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], seed: int | None) -> None:
        self.params = params
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.seen = set(prompt_ids)  # repetition penalty covers prompt and output
        self.output_counts: Counter[int] = Counter()
        # logit bias as one indexed add a step: a Python loop of `logits[id] += bias` took
        # about 8 µs an entry, per sequence, every step
        self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self.bias_checked_for = -1  # the vocabulary size the bias ids were checked against

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalties and logit bias to a `[vocab]` float32 row, in place; returns it.

        In place because the engine's rows are its own, fresh each step: a copy of each row,
        per sequence, every step, cost the server about a tenth of an 8-sequence decode step
        (an allocation, and a release of the GIL that the event loop thread takes).
        """
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(self.seen), dtype=torch.long)
            picked = logits[ids]
            logits[ids] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and self.output_counts:
            ids = torch.tensor(list(self.output_counts), dtype=torch.long)
            counts = torch.tensor(list(self.output_counts.values()), dtype=logits.dtype)
            logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if p.logit_bias:
            vocab = logits.shape[-1]
            if self.bias_checked_for != vocab:
                for token_id in p.logit_bias:
                    if not 0 <= token_id < vocab:
                        raise InvalidRequestError(
                            f"token id {token_id} is outside the vocabulary (size {vocab})",
                            param="logit_bias",
                        )
                self.bias_checked_for = vocab
            logits.index_add_(0, self.bias_ids, self.bias_values.to(logits.dtype))
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from a processed `[vocab]` row."""
        p = self.params
        if p.is_greedy:
            # numpy's argmax (the first maximum, as torch's; no bf16, hence float) takes 4 µs on a
            # 49152-token row where torch's CPU reduction takes about 50: per sequence, every step
            return int(logits.float().contiguous().numpy().argmax())
        row = logits
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the token that crosses top_p
            probs[order[drop]] = 0.0
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        # inverse-CDF draw: torch.multinomial took 1.8 ms on a 49152-token row (per sequence,
        # every step: a quarter of an 8-sequence decode step), this 0.09. The first token
        # whose cumulative sum exceeds u: one of zero probability never is (its sum equals
        # the one before it). u * total can round up to the total itself, where no sum
        # exceeds it: then the draw is the last token that adds to the total.
        cdf = torch.cumsum(probs, dim=-1)
        if not bool(torch.isfinite(cdf[-1])) or float(cdf[-1]) <= 0.0:
            # the row overflowed (a temperature near 0, an extreme penalty): no distribution is
            # left to draw from, and the limit of such a draw is the most likely token
            return int(torch.argmax(torch.nan_to_num(row.float(), nan=float("-inf"))))
        u = torch.rand(1, generator=self.generator) * cdf[-1]
        last = int(torch.searchsorted(cdf, cdf[-1:]))
        return min(int(torch.searchsorted(cdf, u, right=True)), last)

    def record(self, token_id: int) -> None:
        self.seen.add(token_id)
        self.output_counts[token_id] += 1


def top_logprobs(
    logits: torch.Tensor, token_id: int, k: int
) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `k` most likely tokens, from raw logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token_id])
    if k == 0:
        return chosen, []
    values, ids = torch.topk(logprobs, k)
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
