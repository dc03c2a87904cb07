"""Perplexity of a text under a model: what a quantization costs, in one number.

The method is transformers' strided sliding window ("Perplexity of fixed-length models"):
windows of `context_length` tokens start every `stride` tokens, and each window scores only
the tokens the previous one did not reach, so every token after the first is scored exactly
once, with at least `context_length - stride` tokens of context once past the first window.
Chosen over llama-perplexity's chunks (disjoint windows of n_ctx tokens, second half scored)
because it scores the whole text, so a short file still gives a number where llama.cpp wants
2 x n_ctx tokens and drops the tail; and because transformers, the reference the tests check
against, computes the same thing. With `stride = context_length // 2` (the default) the
context each scored token sees is llama.cpp's, apart from the first window; numbers are
therefore close to, not equal to, llama-perplexity's.

Memory stays bounded by one window: its logits (`[context_length, vocab]`) become target
log-probabilities before the next window runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ladle.errors import InvalidRequestError
from ladle.model import Model

DEFAULT_CONTEXT_LENGTH = 512  # llama-perplexity's default n_ctx


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens `[begin, end)` run as one sequence; targets `[first_target, end)` are scored."""

    begin: int
    end: int
    first_target: int


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """What `perplexity` measured."""

    ppl: float
    num_tokens: int  # tokens scored: all but the first
    tokens_per_second: float  # scored tokens per second of wall time, windows' overlap included
    chunk_ppls: tuple[float, ...]  # one per window, over the tokens that window scored


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """transformers' windows: one every `stride` tokens, until one reaches the end."""
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(
    model: Model,
    text: str,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `text`, tokenized as the model's tokenizer does by default.

    Args:
        context_length: tokens per window (at most the model's context).
        stride: tokens between window starts; `context_length // 2` by default.
        progress: called after each window with (windows done, windows in all, perplexity
            so far), for a progress bar.
    """
    stride = context_length // 2 if stride is None else stride
    if not 2 <= context_length <= model.max_sequence_length():
        raise InvalidRequestError(
            f"must be in [2, {model.max_sequence_length()}] (the model's context), "
            f"got {context_length}",
            param="context_length",
        )
    if not 1 <= stride <= context_length - 1:
        raise InvalidRequestError(
            f"must be in [1, context_length - 1 = {context_length - 1}], got {stride}",
            param="stride",
        )
    ids = model.tokenize(text)
    if len(ids) < 2:
        raise InvalidRequestError(
            f"has {len(ids)} token(s); perplexity needs at least 2", param="text"
        )
    windows = sliding_windows(len(ids), context_length, stride)
    nll_sums: list[float] = []
    started = time.perf_counter()
    for i, w in enumerate(windows):
        logits = model.logits_for(ids[w.begin : w.end])
        nll_sums.append(_nll_sum(logits, ids, w))
        if progress is not None:
            progress(i + 1, len(windows), math.exp(sum(nll_sums) / (w.end - 1)))
    elapsed = time.perf_counter() - started
    num_tokens = len(ids) - 1
    return PerplexityResult(
        ppl=math.exp(sum(nll_sums) / num_tokens),
        num_tokens=num_tokens,
        tokens_per_second=num_tokens / elapsed,
        chunk_ppls=tuple(
            math.exp(s / (w.end - w.first_target)) for s, w in zip(nll_sums, windows, strict=True)
        ),
    )


def _nll_sum(logits: torch.Tensor, ids: list[int], w: Window) -> float:
    """Negative log-likelihood of the window's targets; row `t - 1 - begin` predicts token t."""
    rows = logits[w.first_target - 1 - w.begin : w.end - 1 - w.begin]  # [num_targets, vocab]
    targets = torch.tensor(ids[w.first_target : w.end], dtype=torch.long)
    logprobs = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])
    return -float(logprobs.sum(dtype=torch.float64))
