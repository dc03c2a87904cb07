"""8-bit weights: GGML's 5-, 6- and 8-bit types on ladle's kernel, or Q8_0 on torch's
`_weight_int8pack_mm`.

With the native kernels, the int8 kernel (`kernels/quant_linear.cpp`) takes `w = q * scale
(+ zero)` with q in int8, fp16 scales (and zeros) per group of 32 k or scales per 16 k, and
float32 activations (int16 per group of 32 inside). GGML's Q8_0, Q5_0, Q5_1, Q5_K and Q6_K
are such groups (`ggml_blocks.py` reads their integers): Q8_0's, Q5_0's and Q5_1's constants
are the file's own fp16 numbers, so the weight is the file's exactly; Q5_K's d * sc and
dmin * m and Q6_K's d * sc are rounded once to fp16 (2^-11 relative). The product is within
~2e-5 of the exact product of the weights held (the activations' int16). Q6_K keeps its six
bits (the kernel's int6 form: a nibble plane and a plane of top bits, 0.875 bytes a weight
with the fp16 scale per 16 k, where int8 took 1.125): the same integers, so the same sums to
the bit, from 22% fewer bytes. It also serves the output head of a model whose table is one
of these (SmolLM2's 49152x576 Q8_0: 30 MB read per step where an fp16 copy is 56 MB; Gemma
3's 262144x640 Q6_K: 147 MB, 189 as int8), and a tied embedding reads its rows back from the
same bytes (`rows`).

Otherwise, Q8_0 goes to torch's `_weight_int8pack_mm`: int8 rows, one scale each, bf16
activations (the other types are decoded: no torch kernel takes their groups).

GGML's Q8_0 has one scale per 32 weights; torch's int8 CPU kernels take one per output row,
so the Q8_0 values are re-rounded to a per-row int8 grid (measured on random 1536x576 weights:
the output differs from the exact Q8_0 matmul by 0.8% relative; a bf16 matmul of the same
values by 0.3%). fbgemm's dynamic int8 linear is faster still (`layers/linear.py`), but it
also rounds the activations to uint8 with one scale per call: on the tiny Llama GGUF of
`tests/engine/models/test_llama.py` (Q8_0 v_proj) that moved logits by 0.057 against
transformers, past the test's 0.05 bound, which this kernel stays within; so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType

from ladle.engine.kernels import native
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.ggml_blocks import INT8_TYPES, Int8Groups, unpack_int8

_COLS = 16  # output columns per block of the native layout
_SLICE_ROWS = 4096  # rows packed at a time (a multiple of _COLS)


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
    """Integer groups in the native int8 layout: per block of 16 output columns, 2 k per
    16-bit lane."""

    q: torch.Tensor  # int8 [out / 16, in / 2, 32]: bytes 2j, 2j + 1 of pair p are column j's
    # k = 2p, 2p + 1; or (Q6_K) uint8 [out / 16, in / 2, 24], those 32 values + 32 in six
    # bits: their low nibbles as int4's pairs, then 8 bytes of top bits (`pack_native6`)
    scales: torch.Tensor  # fp16 [out / 16, in / group, 16]: w = q * scale; or
    # [out / 16, in / 32, 2, 16], scales then zeros: w = q * scale + zero
    kernel: native.KernelWeight = field(init=False)

    def __post_init__(self) -> None:
        self.kernel = native.KernelWeight.of(self.q, self.scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return native.linear(x, self.kernel)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of w (any shape of ids) as float32: an embedding lookup in the same bytes."""
        block, column = ids // _COLS, ids % _COLS
        k = self.q.shape[1] * 2
        if self.q.dtype == torch.uint8:
            pairs = _six_bit_pairs(self.q, block, column)
        else:
            pairs = self.q.view(*self.q.shape[:2], _COLS, 2)[block, :, column]  # [..., k / 2, 2]
        has_zeros = self.scales.dim() == 4
        scales = self.scales[:, :, 0] if has_zeros else self.scales  # [out / 16, groups, 16]
        num_groups = scales.shape[1]
        groups = pairs.reshape(*ids.shape, num_groups, k // num_groups).float()
        groups = groups * scales[block, :, column].float()[..., None]
        if has_zeros:
            groups = groups + self.scales[:, :, 1][block, :, column].float()[..., None]
        return groups.reshape(*ids.shape, k)


def can_pack_native8(weight: GGMLTensor) -> bool:
    """Whether a GGML weight has an exact native int8 form: its type is one `ggml_blocks`
    unpacks to int8 groups and its rows come in sixteens (every such type's block is 32 or 256
    wide, so k is a multiple of the kernel's 32)."""
    return (
        weight.ggml_type in INT8_TYPES and len(weight.shape) == 2 and weight.shape[0] % _COLS == 0
    )


def pack_ggml8(weight: GGMLTensor) -> NativeInt8Weight:
    """A Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K weight in the native int8 layout (Q6_K in its int6
    form), its integers exact (Q5_K's and Q6_K's per-group scales and zeros rounded once to
    fp16).

    Packed a slice of rows at a time into the final tensors, so that loading a large table
    (Gemma 3's 262144 x 640 embedding: 168 MB of int8) holds no second whole copy of it.
    """
    n, k = weight.shape
    rows = weight.data.reshape(n, -1)
    q: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    for start in range(0, n, _SLICE_ROWS):
        stop = min(start + _SLICE_ROWS, n)
        piece = GGMLTensor(weight.name, weight.ggml_type, rows[start:stop], (stop - start, k))
        groups = unpack_int8(piece)
        six_bits = weight.ggml_type == GGMLQuantizationType.Q6_K
        packed = pack_native6(groups) if six_bits else pack_native8(*groups)
        if q is None or scales is None:
            q = torch.empty(n // _COLS, *packed.q.shape[1:], dtype=packed.q.dtype)
            scales = torch.empty(n // _COLS, *packed.scales.shape[1:], dtype=torch.float16)
        q[start // _COLS : stop // _COLS] = packed.q
        scales[start // _COLS : stop // _COLS] = packed.scales
    assert q is not None and scales is not None, f"{weight.name}: no rows"
    return NativeInt8Weight(q, scales)


def pack_native8(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int
) -> NativeInt8Weight:
    """Pack `w = q * scale (+ zero)` (q int8 [n, k]; scale, zero [n, k / group]; n a multiple
    of 16, group 32, or 16 without zeros): each column's k in pairs, scales and zeros in fp16."""
    n, k = q.shape
    pairs = q.reshape(n // _COLS, _COLS, k // 2, 2).transpose(1, 2)  # [n / 16, k / 2, col, 2]
    columns = [
        t.reshape(n // _COLS, _COLS, k // group).transpose(1, 2)  # [n / 16, k / group, col]
        for t in (scale, zero)
        if t is not None
    ]
    scales = columns[0] if zero is None else torch.stack(columns, dim=2)
    return NativeInt8Weight(
        pairs.reshape(n // _COLS, k // 2, 2 * _COLS).contiguous(),
        scales.to(torch.float16).contiguous(),
    )


def pack_native6(groups: Int8Groups) -> NativeInt8Weight:
    """Q6_K's integers (q - 32 in int8, a scale per 16 k) in the kernel's int6 form.

    Word w of a pair (`pack_native8`'s 32 bytes, column w // 2 at k = 2p + w % 2) is q + 32
    in 0..63: its low four bits are nibble w % 16 of the pair's first 16 bytes (low nibble for
    w < 16), its top two bits are bits 2 (w // 8), + 1 of byte 16 + w % 8.
    """
    eight = pack_native8(*groups)
    u = (eight.q + 32).view(torch.uint8)  # [n / 16, k / 2, 32], 0..63 (no int8 overflow)
    nibbles = (u[..., :16] & 15) | (u[..., 16:] << 4)  # the shift drops the top bits
    top = (u >> 4).view(*u.shape[:-1], 4, 8)  # [..., s, c]: word c + 8s
    top_bytes = (
        top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    )
    return NativeInt8Weight(torch.cat([nibbles, top_bytes], dim=-1).contiguous(), eight.scales)


def _six_bit_pairs(q: torch.Tensor, block: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Column `column` of blocks `block` of an int6 form, as int8 pairs `[..., k / 2, 2]`."""
    words = 2 * column[..., None] + torch.arange(2)  # [..., 2]: the column's two words
    b = block[..., None]
    nibble_bytes = q[b, :, words % 16].to(torch.int16)  # [..., 2, k / 2]
    nibble = torch.where(words[..., None] < 16, nibble_bytes & 15, nibble_bytes >> 4)
    top = (q[b, :, 16 + words % 8].to(torch.int16) >> (2 * (words // 8))[..., None]) & 3
    return ((nibble | (top << 4)) - 32).to(torch.int8).transpose(-1, -2)
