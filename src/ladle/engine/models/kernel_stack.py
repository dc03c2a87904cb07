"""A decoder's layers in one native call a step, when every layer can take it.

Each decoder layer says what it is to the kernels (`kernel_layer()`: its weights in native
forms, its norms, attention rule and activation, or None when something cannot run there: a
torch-only weight form, bfloat16 compute, calibration). When all of them can, and the cache
is one the kernels address (`AttentionCache.kernel_step`), the whole stack runs as one
`native.Decoder` call: on SmolLM2 a decode step's Python and dispatch fall from ~3 ms to
nothing, and the logits are those of the per-layer path to the bit (the same kernels in the
same order). The decoder is gathered again whenever a `Linear` changes its weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.layers.attention import current_cache
from ladle.engine.layers.linear import weights_generation


class KernelLayer(Protocol):
    use_kernels: bool

    def kernel_layer(self) -> native.LayerWeights | None:
        """This layer for `native.Decoder`, or None when it cannot run there."""
        ...


class KernelStack:
    """The native decoder of one model's layers, built on first use and after each change."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.shape = (hidden, num_heads, num_kv_heads, head_dim)
        self._built: tuple[int, native.Decoder | None] | None = None

    def decoder(self, layers: nn.ModuleList, eps: float) -> native.Decoder | None:
        """The decoder of `layers`, None unless every one of them can run in it."""
        if not all(getattr(layer, "use_kernels", False) for layer in layers):
            return None
        generation = weights_generation()
        if self._built is None or self._built[0] != generation:
            self._built = (generation, self._build(layers, eps))
        return self._built[1]

    def _build(self, layers: Sequence[KernelLayer], eps: float) -> native.Decoder | None:
        gathered = [layer.kernel_layer() for layer in layers]
        found = [layer for layer in gathered if layer is not None]
        if len(found) != len(gathered):
            return None
        hidden, num_heads, num_kv_heads, head_dim = self.shape
        return native.Decoder(found, hidden, num_heads, num_kv_heads, head_dim, eps)

    def run(
        self, layers: nn.ModuleList, eps: float, x: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor | None:
        """x [T, hidden] through every layer in one call, or None when the stack, the dtype or
        the cache cannot (the caller then runs the layers one by one)."""
        if x.dtype != torch.float32 or torch.compiler.is_compiling():
            return None
        decoder = self.decoder(layers, eps)
        step = current_cache().kernel_step(x.shape[0]) if decoder is not None else None
        if decoder is None or step is None:
            return None
        return decoder.run(
            x,
            rope,
            step.pools_k,
            step.pools_v,
            step.block_tables,
            step.lengths,
            step.query_lens,
            step.slots,
            step.block_size,
            step.is_decode,
        )


def norm_weight(norm: nn.Module | None) -> torch.Tensor | None:
    """An RMSNorm's float32 weight as the kernels take it (Gemma's 1 + w already formed)."""
    weight = getattr(norm, "weight", None)
    return weight if weight is not None and weight.dtype == torch.float32 else None
