"""8-bit weights: GGML Q8_0 as it is on ladle's kernel, or on torch's `_weight_int8pack_mm`.

With the native kernels, `ladle_kernels::int8_linear` (`kernels/quant_linear.cpp`) takes Q8_0's
int8 values and fp16 scales per 32 unchanged, and float32 activations (int16 per group of 32
inside): the product of the file's own weights within 2e-5. It also serves the output head of
a model whose table is Q8_0 (SmolLM2's 49152x576: 30 MB read per step where an fp16 copy is
56 MB), and a tied embedding reads its rows back from the same bytes (`rows`).

Otherwise, torch's `_weight_int8pack_mm`: int8 rows, one scale each, bf16 activations.

GGML's Q8_0 has one scale per 32 weights; torch's int8 CPU kernels take one per output row,
so the Q8_0 values are re-rounded to a per-row int8 grid (measured on random 1536x576 weights:
the output differs from the exact Q8_0 matmul by 0.8% relative; a bf16 matmul of the same
values by 0.3%). fbgemm's dynamic int8 linear is faster still (`layers/linear.py`), but it
also rounds the activations to uint8 with one scale per call: on the tiny Llama GGUF of
`tests/engine/models/test_llama.py` (Q8_0 v_proj) that moved logits by 0.057 against
transformers, past the test's 0.05 bound, which this kernel stays within; so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.native_matmul import native_matmul

_COLS = 16  # output columns per block of the native layout
_GROUP = 32


@dataclass(slots=True)
class Int8Weight:
    q: torch.Tensor  # int8 [out_features, in_features]
    scales: torch.Tensor  # bf16 [out_features]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, self.q, self.scales)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def pack_int8(weight: torch.Tensor) -> Int8Weight:
    """Round `[out, in]` to int8 with one symmetric scale per row (the scale rounded to bf16)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales)


@dataclass(slots=True)
class NativeInt8Weight:
    """Q8_0 in `int8_linear`'s layout: per block of 16 output columns, 2 k per 16-bit lane."""

    q: torch.Tensor  # int8 [out / 16, in / 2, 32]: bytes 2j, 2j + 1 of pair p are column j's
    # k = 2p, 2p + 1
    scales: torch.Tensor  # fp16 [out / 16, in / 32, 16]: w = q * scale

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return native_matmul(torch.ops.ladle_kernels.int8_linear, x, self.q, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of w (any shape of ids) as float32: an embedding lookup in the same bytes."""
        block, column = ids // _COLS, ids % _COLS
        k = self.q.shape[1] * 2
        pairs = self.q.view(*self.q.shape[:2], _COLS, 2)[block, :, column]  # [..., k / 2, 2]
        scale = self.scales[block, :, column].float()  # [..., k / 32]
        groups = pairs.reshape(*ids.shape, k // _GROUP, _GROUP).float() * scale[..., None]
        return groups.reshape(*ids.shape, k)


def can_pack_native8(weight: GGMLTensor) -> bool:
    return (
        weight.ggml_type == GGMLQuantizationType.Q8_0
        and len(weight.shape) == 2
        and weight.shape[0] % _COLS == 0
    )


def pack_native8(weight: GGMLTensor) -> NativeInt8Weight:
    """A Q8_0 weight's blocks (fp16 d, then 32 int8) in `int8_linear`'s layout, exactly."""
    n, k = weight.shape
    blocks = np.ascontiguousarray(weight.data).reshape(n, k // _GROUP, 34)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])  # [n, k / 32]
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
    pairs = q.reshape(n // _COLS, _COLS, k // 2, 2).transpose(1, 2)
    scales = d.reshape(n // _COLS, _COLS, k // _GROUP).transpose(1, 2)
    return NativeInt8Weight(
        pairs.reshape(n // _COLS, k // 2, 2 * _COLS).contiguous(), scales.contiguous()
    )
