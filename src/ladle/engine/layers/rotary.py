"""Rotary position embeddings in the rotate-half (NEOX) layout Hugging Face checkpoints use.

Frequencies follow transformers' `modeling_rope_utils` formula for formula, so a model gets
the same angles whichever library runs it. cos/sin are tabulated once per position and
looked up by `positions`; the table grows by doubling when a sequence outgrows it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ladle.engine.kernels import native

_INITIAL_POSITIONS = 4096


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """Channels of each head that rotate (transformers truncates `head_dim * factor`)."""
    return int(round(head_dim * partial_rotary_factor, 6))


def rope_frequencies(
    dim: int,
    base: float,
    scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    long: bool = False,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[dim / 2]` and the attention scaling applied to cos and sin.

    `dim` is the rotary dimension; `long` picks LongRoPE's long factors. `dynamic` NTK equals
    plain RoPE up to `max_position_embeddings`, the longest context ladle runs it at.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(dim, base, scaling, max_position_embeddings)
    if rope_type == "longrope":
        return _longrope(exponents, base, scaling, max_position_embeddings, long)
    raise ValueError(f"rope type '{rope_type}' is not supported")


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    dim: int, base: float, scaling: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero, as transformers does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where a channel keeps its original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(
    exponents: torch.Tensor,
    base: float,
    scaling: dict[str, Any],
    max_position_embeddings: int,
    long: bool,
) -> tuple[torch.Tensor, float]:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * base**exponents), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one RoPE configuration, shared by every layer that uses it.

    LongRoPE keeps a second table: like transformers, a forward whose sequence (cached plus
    new tokens) exceeds `original_max_position_embeddings` uses the long factors throughout.
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        partial_rotary_factor: float = 1.0,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__()
        self.dim = rotary_dim(head_dim, partial_rotary_factor)
        inv_freq, self.attention_scaling = rope_frequencies(
            self.dim, base, scaling, max_position_embeddings
        )
        self.inv_freq = [inv_freq]
        self.long_after: int | None = None  # sequence length past which long factors apply
        if scaling and scaling["rope_type"] == "longrope":
            long_inv_freq, _ = rope_frequencies(
                self.dim, base, scaling, max_position_embeddings, long=True
            )
            self.inv_freq.append(long_inv_freq)
            self.long_after = scaling["original_max_position_embeddings"]
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _build(self, num_positions: int, dtype: torch.dtype, device: torch.device) -> None:
        positions = torch.arange(num_positions, dtype=torch.float32)
        tables = []  # filled, then swapped in whole: the step compiler's thread reads them too
        for inv_freq in self.inv_freq:
            freqs = torch.outer(positions, inv_freq)  # [positions, dim / 2], as transformers
            cos = (freqs.cos() * self.attention_scaling).to(dtype=dtype, device=device)
            sin = (freqs.sin() * self.attention_scaling).to(dtype=dtype, device=device)
            # laid out for `apply_rotary`'s one multiply-add over both halves
            tables.append((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)))
        self.tables = tables

    def forward(
        self, positions: torch.Tensor, seq_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[T, 1, dim]` for `positions`; `seq_len` bounds them (no host sync).

        Both halves of cos hold cos, and sin holds `-sin` then `sin`: see `apply_rotary`.
        """
        tables = self.tables
        table_len = tables[0][0].shape[0] if tables else 0
        if seq_len > table_len or tables[0][0].dtype != dtype:
            size = max(seq_len, 2 * table_len, _INITIAL_POSITIONS)
            self._build(size, dtype, positions.device)
            tables = self.tables
        is_long = self.long_after is not None and seq_len > self.long_after
        cos, sin = tables[1 if is_long else 0]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_kernel: bool = False
) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]`; channels past the rotary dimension pass through.

    `(x1 cos - x2 sin, x2 cos + x1 sin)` as `x * cos + roll(x) * sin` with the tables' layout:
    the same products and sums, bit for bit, in four kernel calls instead of seven (the
    decode step is bound by the number of calls), or in one with `use_kernel` (float32 only).
    """
    if use_kernel and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return native.rotary(x, cos, sin)
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + x.roll(dim // 2, -1) * sin
    head = x[..., :dim]
    return torch.cat((head * cos + head.roll(dim // 2, -1) * sin, x[..., dim:]), dim=-1)
