"""Dense weights to GGML block bytes: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32.

The output is a `GGMLTensor`, byte for byte what llama.cpp writes, so an ISQ layer, a GGUF
file written by `ladle quantize`, and the `gguf` package's decoder all agree. Scales are
chosen by the weighted searches of `search.py`, optionally weighted by an importance matrix
(mean squared activation per input channel), minimizing `sum w_i (x_i - q_i)^2` per block as
llama.cpp's `quantize_row_*_impl` do. Q8_0 ignores the importance matrix, as llama.cpp does:
at 8 bits the round-to-nearest error is already far below the other types'.

With an importance matrix every block is also quantized without it (and, for Q4_0 / Q4_1,
by llama.cpp's plain rounding, `gguf.quants`' reference), and the block keeps whichever
decodes with the smallest weighted error, so calibration never loses against those under the
error it minimizes. The search alone cannot promise that: a K-quant's group scales are
rounded to 6 bits after the search, and with weights that span orders of magnitude the
least-squares fits lose precision; the plain fit of an already quantized source (SmolLM2's
Q4_1 weights) even recovers that source's grid exactly.
Everything is vectorized over blocks in torch; rows are processed in slices to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as reference_quantize

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.search import (
    IMATRIX_GRID,
    PLAIN_GRID,
    affine_scale_min,
    importance,
    one_thread,
    positive_grid,
    symmetric_scale,
)

Q = GGMLQuantizationType
Quantizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (rows, imatrix) -> bytes
_SLICE_ELEMENTS = 1 << 17  # rows per slice: 512 kB of fp32 input, its temporaries in cache


def quantize(
    weight: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    imatrix: torch.Tensor | None = None,
    name: str = "weight",
) -> GGMLTensor:
    """Quantize a 2-D weight `[out, in]` (`in` a multiple of the block size) to `ggml_type`.

    `imatrix` ([in], non-negative) weights each input channel's error; None weighs by
    magnitude only.
    """
    if ggml_type not in _QUANTIZERS:
        raise ValueError(
            f"{name}: cannot quantize to {ggml_type.name} "
            f"(quantizable: {', '.join(t.name for t in _QUANTIZERS)})"
        )
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rows, cols = weight.shape
    if cols % block_size:
        raise ValueError(
            f"{name}: {cols} input features are not a multiple of "
            f"{ggml_type.name}'s block of {block_size}"
        )
    if imatrix is not None and tuple(imatrix.shape) != (cols,):
        raise ValueError(
            f"{name}: importance matrix of shape {tuple(imatrix.shape)}, need ({cols},)"
        )
    out = np.empty((rows, cols // block_size * type_size), dtype=np.uint8)
    step = max(1, _SLICE_ELEMENTS // cols)
    with one_thread():
        for start in range(0, rows, step):
            x = weight[start : start + step].detach().to(torch.float32)
            data = _QUANTIZERS[ggml_type](x, imatrix)
            if imatrix is not None and ggml_type in _SIGMA_SCALE:
                candidates = [_QUANTIZERS[ggml_type](x, None), data]  # ties keep the first
                if ggml_type in _ROUNDED:
                    rounded = reference_quantize(x.numpy(), ggml_type)
                    candidates.insert(1, torch.from_numpy(rounded).view(data.shape))
                data = _least_error(x, error_weights(x, imatrix, ggml_type), candidates, ggml_type)
            out[start : start + len(x)] = data.reshape(len(x), -1).numpy()
    return GGMLTensor(name, ggml_type, out, (rows, cols))


def error_weights(
    x: torch.Tensor, imatrix: torch.Tensor | None, ggml_type: GGMLQuantizationType
) -> torch.Tensor:
    """The weights `w` [rows, in] of the error `sum w_i (x_i - q_i)^2` that `ggml_type`'s
    search minimizes for rows `x`, given the importance matrix (None: by magnitude)."""
    return importance(x, imatrix, _SIGMA_SCALE.get(ggml_type, 1.0))


def _least_error(
    x: torch.Tensor,
    w: torch.Tensor,
    candidates: list[torch.Tensor],
    ggml_type: GGMLQuantizationType,
) -> torch.Tensor:
    """Per block, the candidate's bytes ([blocks, type size]) that decode with the least
    weighted error; among equals, the earliest."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    xb, wb = x.reshape(-1, block), w.reshape(-1, block)

    def error(data: torch.Tensor) -> torch.Tensor:
        values = torch.from_numpy(dequantize(data.reshape(len(x), -1).numpy(), ggml_type))
        return (wb * (values.reshape(-1, block) - xb) ** 2).sum(-1)

    best, best_err = candidates[0], error(candidates[0])
    for data in candidates[1:]:
        err = error(data)
        better = err < best_err
        best = torch.where(better[:, None], data, best)
        best_err = torch.where(better, err, best_err)
    return best


def _dense(dtype: torch.dtype) -> Quantizer:
    def convert(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        return x.to(dtype).contiguous().view(torch.uint8)

    return convert


def _q8_0(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half()
    q = (blocks / _nonzero(d.float())).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([_bytes(d), q.view(torch.uint8)], dim=-1)


def _q4_0(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    w = error_weights(x, imatrix, Q.Q4_0).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    d = symmetric_scale(blocks, w, 8).half()
    q = (blocks / _nonzero(d.float())).round().clamp(-8, 7) + 8
    return torch.cat([_bytes(d), _pack_nibbles(q.to(torch.uint8))], dim=-1)


def _q4_1(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    w = error_weights(x, imatrix, Q.Q4_1).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    grid = PLAIN_GRID if imatrix is None else IMATRIX_GRID
    scale, mn = affine_scale_min(blocks, w, 15, grid, signed_min=True)
    d, m = scale.half(), mn.half()
    q = ((blocks - m.float()) / _nonzero(d.float())).round().clamp(0, 15)
    return torch.cat([_bytes(d), _bytes(m), _pack_nibbles(q.to(torch.uint8))], dim=-1)


def _k_affine(
    x: torch.Tensor, imatrix: torch.Tensor | None, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 8 groups of 32 per super-block of 256, 6-bit scales and mins.

    Without an importance matrix the 6-bit scales and mins are rounded against their maximum
    (`quantize_row_q4_K_ref`); with one, they are fitted under each group's total weight
    (`make_qp_quants`), as llama.cpp's `quantize_row_q4_K_impl` does.
    Returns (d, dmin) fp16 [B, 1], 6-bit (sc, m) [B, 8] and the integers q [B, 8, 32].
    """
    w = error_weights(x, imatrix, Q.Q4_K).reshape(-1, 8, 32)
    groups = x.reshape(-1, 8, 32)
    grid = PLAIN_GRID if imatrix is None else IMATRIX_GRID
    scale, mn = affine_scale_min(groups, w, nmax, grid)  # [B, 8, 1]
    if imatrix is None:
        d = (scale.amax(dim=1) / 63).half()  # [B, 1]
        dmin = (-mn).amax(dim=1).div(63).half()
        sc = (scale[..., 0] / _nonzero(d.float())).round().clamp(0, 63)
        m = (-mn[..., 0] / _nonzero(dmin.float())).round().clamp(0, 63)
    else:
        group_weight = w.sum(-1)  # [B, 8]
        d, sc = positive_grid(scale[..., 0], group_weight, 63)
        dmin, m = positive_grid(-mn[..., 0], group_weight, 63)
        d, dmin = d.half(), dmin.half()
    eff_scale = (d.float() * sc)[..., None]
    eff_min = (dmin.float() * m)[..., None]
    q = ((groups + eff_min) / _nonzero(eff_scale)).round().clamp(0, nmax)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8)


def _q4_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    d, dmin, sc, m, q = _k_affine(x, imatrix, 15)
    pairs = q.reshape(-1, 4, 2, 32)  # group 2j in low nibbles, 2j + 1 in high ones
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_bytes(d), _bytes(dmin), _pack_scale_min_k4(sc, m), qs], dim=-1)


def _q5_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    d, dmin, sc, m, q = _k_affine(x, imatrix, 31)
    low = q & 0x0F
    pairs = low.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).to(torch.int32)  # [B, 8, 32]: group i's fifth bit goes to bit i of qh
    shifts = torch.arange(8, dtype=torch.int32)[None, :, None]
    qh = (high << shifts).sum(dim=1).to(torch.uint8)  # [B, 32]
    return torch.cat([_bytes(d), _bytes(dmin), _pack_scale_min_k4(sc, m), qh, qs], dim=-1)


def _q6_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    w = error_weights(x, imatrix, Q.Q6_K).reshape(-1, 16, 16)
    groups = x.reshape(-1, 16, 16)
    scale = symmetric_scale(groups, w, 32)[..., 0]  # [B, 16]
    idx = scale.abs().argmax(dim=-1, keepdim=True)
    max_scale = scale.gather(-1, idx)  # signed, [B, 1]
    d = (max_scale / -128).half()
    sc = (scale / _nonzero(d.float())).round().clamp(-128, 127)
    eff = (d.float() * sc)[..., None]
    q = ((groups / _nonzero(eff)).round().clamp(-32, 31) + 32).to(torch.uint8)
    # 256 values = 2 halves of 128; in a half, value r: ql nibble r // 64 of byte r % 64,
    # qh bits 2 (r // 32) of byte r % 32
    half = q.reshape(-1, 2, 128)
    low = (half & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (half >> 4).reshape(-1, 2, 4, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[None, None, :, None]
    qh = (high << shifts).sum(dim=2).to(torch.uint8).reshape(-1, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _bytes(d)], dim=-1)


def _pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The inverse of ggml's `get_scale_min_k4`: 8 six-bit scales and mins in 12 bytes."""
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = m[:, :4], m[:, 4:]
    b0 = lo_sc | ((hi_sc >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)
    return torch.cat([b0, b1, b2], dim=-1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 values per block: 0..15 in the low nibbles, 16..31 in the high ones."""
    return q[:, :16] | (q[:, 16:] << 4)


def _bytes(values: torch.Tensor) -> torch.Tensor:
    """fp16 `[B, 1]` as its two little-endian bytes `[B, 2]`."""
    return values.contiguous().view(torch.uint8)


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


_QUANTIZERS: dict[
    GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
] = {
    Q.F32: _dense(torch.float32),
    Q.F16: _dense(torch.float16),
    Q.BF16: _dense(torch.bfloat16),
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
QUANTIZABLE = frozenset(_QUANTIZERS)
# Types whose search an importance matrix weights, and the `sigma_scale` of their weights.
_SIGMA_SCALE = {Q.Q4_0: 1.0, Q.Q4_1: 1.0, Q.Q4_K: 2.0, Q.Q5_K: 2.0, Q.Q6_K: 2.0}
_ROUNDED = (Q.Q4_0, Q.Q4_1)  # types whose unweighted search is not llama.cpp's plain rounding
