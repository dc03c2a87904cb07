"""Causal self-attention over a KV cache, with grouped-query heads, one sequence at a time.

The new tokens' keys and values go into the cache first; each sequence's queries then attend
to its cached positions up to their own (the causal mask is offset by what was cached before),
within an optional sliding window. A batch of sequences of different lengths runs one kernel
call per sequence: on a CPU that beats padding them into one call (no wasted keys, no mask).
Prefill runs through `scaled_dot_product_attention`; one decoded token runs through two
batched matmuls (fewer calls than SDPA for a single query). A cache with native kernels runs
attention itself when it can (`AttentionCache.attend`: float32 queries, any window or
soft-cap): the engine's paged batch does every sequence of a step in one call, each row
computing what
a decode of it alone computes, so a prompt's logits do not depend on its chunks or on the
prefix cache. Logit soft-capping (Gemma 2) needs the scores themselves, so it takes an
explicit path. A cache may store keys and values narrower than the queries (float16): they
are read in the queries' dtype.

Attention is the one step of a forward that reads and writes state outside its tensors (the
cache), so it is an operator of its own, `torch.ops.ladle.attention`, whose cache is set per
thread by `attention_cache`. `torch.compile` sees an opaque call with a known output shape and
compiles everything around it into one graph; eagerly, the operator costs about 2 µs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kv_cache import AttentionCache, Segment

_local = threading.local()  # the cache that this thread's forward reads and writes


@contextmanager
def attention_cache(cache: AttentionCache) -> Iterator[None]:
    """Make `cache` the one that attention layers use during a forward on this thread."""
    previous = getattr(_local, "cache", None)
    _local.cache = cache
    try:
        yield
    finally:
        _local.cache = previous


def current_cache() -> AttentionCache:
    """The cache set by `attention_cache` on this thread."""
    cache: AttentionCache | None = getattr(_local, "cache", None)
    if cache is None:
        raise RuntimeError("attention ran outside `attention_cache(cache)`")
    return cache


class Attention(nn.Module):
    """Softmax attention of `q` `[T, H, D]` over the cache after adding `k`, `v` `[T, KVH, D]`.

    Head counts and sizes come from the tensors' shapes; the layer holds only what they do not
    say: which cache layer it is, the score scale, its window and its soft-cap.
    """

    def __init__(
        self,
        layer_idx: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [T, H * D]
        return torch.ops.ladle.attention(
            q, k, v, self.layer_idx, self.scale, self.sliding_window, self.logit_softcap
        )


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    cache = current_cache()
    out = cache.attend(layer_idx, q, k, v, scale, sliding_window, logit_softcap)
    if out is not None:
        return out
    segments = cache.store(layer_idx, k, v)
    args = (scale, sliding_window, logit_softcap)
    if len(segments) == 1:
        return _attend(q, segments[0], *args)
    return torch.cat([_attend(q[s.rows], s, *args) for s in segments])


def _attend(
    q: torch.Tensor,
    segment: Segment,
    scale: float,
    window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    (num_tokens, num_heads, head_dim), start = q.shape, segment.start
    keys, values = segment.keys, segment.values
    mask, is_causal = None, False
    # a decoded token sees every cached position, or the last `window`
    if num_tokens == 1 and window is not None and keys.shape[1] > window:
        keys, values = keys[:, -window:], values[:, -window:]
    # SDPA and the matmuls take one dtype: a float16 cache is widened (only what is read)
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    if num_tokens == 1:
        if logit_softcap is None:
            return _decode(q[0], keys, values, scale).view(1, -1)
    elif start == 0 and (window is None or window >= num_tokens):
        is_causal = True
    else:
        mask = _mask(num_tokens, start, window, q.device)
    q = q.transpose(0, 1)  # [H, T, D]
    if logit_softcap is None:
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),  # 4-D: torch's CPU kernels are fast only on batched input
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=num_heads != keys.shape[0],
        )[0]
    else:
        if is_causal:
            mask = _mask(num_tokens, start, window, q.device)
        out = _softcapped(q, keys, values, mask, scale, logit_softcap)
    return out.transpose(0, 1).reshape(num_tokens, num_heads * head_dim)


def _decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per head `[H, D]` over `[KVH, L, D]`: two batched matmuls and a softmax.

    Query heads of one KV head are adjacent, so grouping them needs no copy of K or V.
    """
    kv_heads, (num_heads, head_dim) = keys.shape[0], q.shape
    grouped = q.view(kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.baddbmm(
        grouped.new_empty(()), grouped, keys.transpose(1, 2), beta=0.0, alpha=scale
    )
    return torch.bmm(torch.softmax(scores, dim=-1), values).view(num_heads, -1)


def _softcapped(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """`cap * tanh(scores / cap)` before the mask and softmax, as Gemma 2 defines it."""
    kv_heads, (num_heads, num_tokens, head_dim) = keys.shape[0], q.shape
    group = num_heads // kv_heads
    # Query heads of one KV head are adjacent, so grouping needs no copy of K or V.
    scores = q.reshape(kv_heads, group * num_tokens, head_dim) @ keys.transpose(1, 2)
    scores = torch.tanh(scores * scale / cap) * cap
    scores = scores.view(kv_heads, group, num_tokens, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs.view(kv_heads, group * num_tokens, -1) @ values
    return out.view(num_heads, num_tokens, head_dim)


def _mask(num_tokens: int, start: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean `[T, start + T]`: True where query `start + i` may see key `j`."""
    q_pos = torch.arange(start, start + num_tokens, device=device).unsqueeze(1)
    kv_pos = torch.arange(start + num_tokens, device=device).unsqueeze(0)
    allowed = kv_pos <= q_pos
    if window is not None:
        allowed &= kv_pos > q_pos - window
    return allowed


# A plain `Library` operator rather than `torch.library.custom_op`: the latter's Python
# wrapper costs ~70 µs a call, which thirty layers would pay on every decode step.
_lib = torch.library.Library("ladle", "DEF")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, int layer_idx, float scale, "
    "int? sliding_window, float? logit_softcap) -> Tensor"
)
_lib.impl("attention", _attention, "CompositeExplicitAutograd")


@torch.library.register_fake("ladle::attention", lib=_lib)
def _attention_shape(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * v.shape[2])
