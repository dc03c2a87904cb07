"""GGML 4-bit blocks repacked for a CPU int4 kernel, without re-quantizing.

Two kernels take them, chosen when the weight is packed:
- ladle's own int4 kernel (`kernels/quant_linear.cpp`) when the native kernels are
  available: float32 activations quantized to int16 per group of 32 as they enter, integer
  dot products (VNNI, or vpmaddwd on AVX2), scales and zeros in fp16. Against torch's kernel
  on SmolLM2's shapes (2 AVX-512 cores): 2-2.5x faster at 1 and 8 rows, 2x at 512 rows; max
  error 2e-5 of the output's scale where torch's (bf16 activations) is 4e-3.
- torch's `_weight_int4pack_mm_for_cpu` otherwise, described below.

torch's `_weight_int4pack_mm_for_cpu` computes `w = (q - 8) * scale + zero` per group of 32
input channels, with `scales_and_zeros` shaped `[in_features / 32, out_features, 2]`. GGML's
4-bit formats are exactly such groups:
    Q4_0: w = d * (q - 8)             -> scale = d,      zero = 0
    Q4_1: w = d * q + m               -> scale = d,      zero = m + 8 d
    Q4_K: w = d * sc * q - dmin * m   -> scale = d * sc, zero = 8 d sc - dmin m
(Q4_K: super-blocks of 256 = 8 groups of 32, with 6-bit sc and m per group.)
All three store nibbles "all low, then all high": a Q4_0 / Q4_1 block's 16 bytes hold values
0..15 in their low nibbles and 16..31 in their high ones; each 32 bytes of a Q4_K super-block
hold 64 values, group 2j in the low nibbles and group 2j + 1 in the high ones.
Scales and zeros are rounded to bf16 (the kernel's format), and the kernel is fast only with
bf16 activations (measured: 28 µs vs 780 µs in fp32 for 1536x576), so inputs are cast to
bf16 and the result cast back: outputs differ from fp32 by ~3e-3 relative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ladle.engine.kernels import native
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.ggml_blocks import f16, nibbles, scale_min_k4

GROUP_SIZE = 32
_OUT_MULTIPLE = 16  # torch's CPU packer rejects out_features not divisible by 16

# (q [n, k] uint8 in 0..15, scale [n, k / 32] fp32, zero [n, k / 32] fp32)
Affine4 = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(slots=True)
class Int4Weight:
    packed: torch.Tensor  # uint8 [out_features, in_features / 2], torch's CPU layout
    scales_and_zeros: torch.Tensor  # bf16 [in_features / group_size, out_features, 2]
    group_size: int = GROUP_SIZE  # 32 for GGML blocks, 64 for HQQ4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


@dataclass(slots=True)
class NativeInt4Weight:
    """The groups in the native int4 layout (`kernels/quant_linear.cpp`): per block of 16
    output columns, 2 k per byte."""

    q: torch.Tensor  # uint8 [out / 16, in / 2, 16]: byte i of pair p holds column i / 2 (low
    # nibble) and column 8 + i / 2 (high nibble) at k = 2p + i % 2
    scales: torch.Tensor  # fp16 [out / 16, in / 32, 2, 16]: w = q * scale + zero, per column
    group_size: int = GROUP_SIZE  # the source's group (HQQ4: 64, stored as two of 32)
    kernel: native.KernelWeight = field(init=False)

    def __post_init__(self) -> None:
        self.kernel = native.KernelWeight.of(self.q, self.scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return native.linear(x, self.kernel)


def can_pack_int4(weight: GGMLTensor) -> bool:
    return (
        weight.ggml_type in _UNPACKERS
        and len(weight.shape) == 2
        and fits_int4_kernel(weight.shape[0])
    )


def fits_int4_kernel(out_features: int) -> bool:
    return out_features % _OUT_MULTIPLE == 0


def unpack_int4(weight: GGMLTensor) -> Affine4:
    """The exact group-32 form `w = (q - 8) * scale + zero` of a Q4_0 / Q4_1 / Q4_K weight."""
    n, k = weight.shape
    return _UNPACKERS[weight.ggml_type](weight.data.reshape(n, -1), n, k)


def pack_int4(weight: GGMLTensor) -> Int4Weight | NativeInt4Weight:
    """Repack a Q4_0 / Q4_1 / Q4_K weight's nibbles and block constants for an int4 kernel."""
    q, scale, zero = (torch.from_numpy(a) for a in unpack_int4(weight))
    return pack_affine4(q, scale, zero, GROUP_SIZE)


def pack_affine4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> Int4Weight | NativeInt4Weight:
    """Pack `w = (q - 8) * scale + zero` (q [n, k] in 0..15; scale, zero [n, k / group]).

    The native kernel's layout when the kernels load (the first call may build them), else
    torch's; the choice is made once here, so a layer's numerics never change under it.
    """
    if native.load():
        return pack_native4(q, scale, zero, group_size)
    return pack_torch4(q, scale, zero, group_size)


def pack_native4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> NativeInt4Weight:
    """`pack_affine4` for the native kernel: columns 0-7 in the low nibbles and 8-15 in the
    high ones, each column's k in pairs; `q * s + (zero - 8 s)`."""
    n, k = q.shape
    if group_size != GROUP_SIZE:  # each larger group becomes several groups of 32
        scale = scale.repeat_interleave(group_size // GROUP_SIZE, dim=1)
        zero = zero.repeat_interleave(group_size // GROUP_SIZE, dim=1)
    blocks = q.to(torch.uint8).reshape(n // 16, 16, k // 2, 2)  # [block, column, pair, k]
    both = blocks[:, :8] | (blocks[:, 8:] << 4)  # columns j and 8 + j in one byte
    packed = both.permute(0, 2, 1, 3).reshape(n // 16, k // 2, 16)  # byte 2j + k % 2
    offset = zero.double() - 8.0 * scale.double()
    columns = [t.reshape(n // 16, 16, k // GROUP_SIZE).transpose(1, 2) for t in (scale, offset)]
    scales = torch.stack(columns, dim=2).to(torch.float16)
    return NativeInt4Weight(packed.contiguous(), scales.contiguous(), group_size)


def pack_torch4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> Int4Weight:
    """`pack_affine4` for torch's `_weight_int4pack_mm_for_cpu`."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [k / group, n, 2]
    return Int4Weight(packed, sz.to(torch.bfloat16).contiguous(), group_size)


def _unpack_q4_0(rows: np.ndarray, n: int, k: int) -> Affine4:
    blocks = rows.reshape(n, k // 32, 18)
    d = f16(blocks[..., 0:2])
    return nibbles(blocks[..., 2:18]).reshape(n, k), d, np.zeros_like(d)


def _unpack_q4_1(rows: np.ndarray, n: int, k: int) -> Affine4:
    blocks = rows.reshape(n, k // 32, 20)
    d, m = f16(blocks[..., 0:2]), f16(blocks[..., 2:4])
    return nibbles(blocks[..., 4:20]).reshape(n, k), d, m + 8.0 * d


def _unpack_q4_k(rows: np.ndarray, n: int, k: int) -> Affine4:
    blocks = rows.reshape(n, k // 256, 144)
    d = f16(blocks[..., 0:2])[..., None]  # [n, k/256, 1]
    dmin = f16(blocks[..., 2:4])[..., None]
    sc, m = scale_min_k4(blocks[..., 4:16])  # [n, k/256, 8]
    scale = (d * sc).reshape(n, -1)
    zero = 8.0 * scale - (dmin * m).reshape(n, -1)
    qs = blocks[..., 16:144].reshape(n, k // 64, 32)
    return nibbles(qs).reshape(n, k), scale, zero


_UNPACKERS: dict[GGMLQuantizationType, Callable[[np.ndarray, int, int], Affine4]] = {
    GGMLQuantizationType.Q4_0: _unpack_q4_0,
    GGMLQuantizationType.Q4_1: _unpack_q4_1,
    GGMLQuantizationType.Q4_K: _unpack_q4_k,
}
