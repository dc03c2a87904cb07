"""Causal self-attention over a KV cache, with grouped-query heads, one sequence at a time.

The new tokens' keys and values go into the cache first; each sequence's queries then attend
to its cached positions up to their own (the causal mask is offset by what was cached before),
within an optional sliding window. A batch of sequences of different lengths runs one kernel
call per sequence: on a CPU that beats padding them into one call (no wasted keys, no mask).
The common cases run through `scaled_dot_product_attention`; logit soft-capping (Gemma 2)
needs the scores themselves, so it takes an explicit path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kv_cache import AttentionCache, Segment


class Attention(nn.Module):
    """Softmax attention of `q` `[T, H, D]` over the cache after adding `k`, `v` `[T, KVH, D]`."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        scale: float | None = None,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: AttentionCache
    ) -> torch.Tensor:  # [T, H * D]
        segments = cache.store(self.layer_idx, k, v)
        if len(segments) == 1:
            return self._attend(q, segments[0])
        return torch.cat([self._attend(q[s.rows], s) for s in segments])

    def _attend(self, q: torch.Tensor, segment: Segment) -> torch.Tensor:
        num_tokens, start, window = q.shape[0], segment.start, self.sliding_window
        keys, values = segment.keys, segment.values
        mask, is_causal = None, False
        if num_tokens == 1:  # a decoded token sees every cached position, or the last `window`
            if window is not None and keys.shape[1] > window:
                keys, values = keys[:, -window:], values[:, -window:]
        elif start == 0 and (window is None or window >= num_tokens):
            is_causal = True
        else:
            mask = _mask(num_tokens, start, window, q.device)
        if num_tokens == 1 and self.logit_softcap is None:  # decode: the fewest kernel calls
            out = F.scaled_dot_product_attention(
                q.reshape(1, self.num_heads, 1, self.head_dim),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            return out.view(1, self.num_heads * self.head_dim)
        q = q.transpose(0, 1)  # [H, T, D]
        if self.logit_softcap is None:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(0),  # 4-D: torch's CPU kernels are fast only on batched input
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )[0]
        else:
            if is_causal:
                mask = _mask(num_tokens, start, window, q.device)
            out = self._softcapped(q, keys, values, mask)
        return out.transpose(0, 1).reshape(num_tokens, self.num_heads * self.head_dim)

    def _softcapped(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`cap * tanh(scores / cap)` before the mask and softmax, as Gemma 2 defines it."""
        kv_heads, (num_heads, num_tokens, head_dim) = self.num_kv_heads, q.shape
        group = num_heads // kv_heads
        # Query heads of one KV head are adjacent, so grouping needs no copy of K or V.
        scores = q.reshape(kv_heads, group * num_tokens, head_dim) @ keys.transpose(1, 2)
        cap = self.logit_softcap
        assert cap is not None
        scores = torch.tanh(scores * self.scale / cap) * cap
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
