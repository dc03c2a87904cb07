"""Dense weights to GGML block bytes: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32.

The output is a `GGMLTensor`, byte for byte what llama.cpp writes, so an ISQ layer, a GGUF
file written by `ladle quantize`, and the `gguf` package's decoder all agree. Scales are
chosen by the weighted searches of `search.py`, optionally weighted by an importance matrix
(mean squared activation per input channel), minimizing `sum w_i (x_i - q_i)^2` per block as
llama.cpp's `quantize_row_*_impl` do. Q8_0 ignores the importance matrix, as llama.cpp does:
at 8 bits the round-to-nearest error is already far below the other types'.
Everything is vectorized over blocks in torch; rows are processed in slices to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.search import affine_scale_min, importance, one_thread, symmetric_scale

Q = GGMLQuantizationType
Quantizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (rows, imatrix) -> bytes
_SLICE_ELEMENTS = 1 << 20  # rows per slice: about 4 MB of fp32 input, ~100 MB of temporaries


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
            out[start : start + len(x)] = data.reshape(len(x), -1).numpy()
    return GGMLTensor(name, ggml_type, out, (rows, cols))


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
    w = importance(x, imatrix).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    d = symmetric_scale(blocks, w, 8).half()
    q = (blocks / _nonzero(d.float())).round().clamp(-8, 7) + 8
    return torch.cat([_bytes(d), _pack_nibbles(q.to(torch.uint8))], dim=-1)


def _q4_1(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    w = importance(x, imatrix).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    scale, mn = affine_scale_min(blocks, w, 15, signed_min=True)
    d, m = scale.half(), mn.half()
    q = ((blocks - m.float()) / _nonzero(d.float())).round().clamp(0, 15)
    return torch.cat([_bytes(d), _bytes(m), _pack_nibbles(q.to(torch.uint8))], dim=-1)


def _k_affine(
    x: torch.Tensor, imatrix: torch.Tensor | None, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 8 groups of 32 per super-block of 256, 6-bit scales and mins.

    Returns (d, dmin) fp16 [B, 1], 6-bit (sc, m) [B, 8] and the integers q [B, 8, 32].
    """
    w = importance(x, imatrix, sigma_scale=2.0).reshape(-1, 8, 32)
    groups = x.reshape(-1, 8, 32)
    scale, mn = affine_scale_min(groups, w, nmax)  # [B, 8, 1]
    d = (scale.amax(dim=1) / 63).half()  # [B, 1]
    dmin = (-mn).amax(dim=1).div(63).half()
    sc = (scale[..., 0] / _nonzero(d.float())).round().clamp(0, 63)
    m = (-mn[..., 0] / _nonzero(dmin.float())).round().clamp(0, 63)
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
    w = importance(x, imatrix, sigma_scale=2.0).reshape(-1, 16, 16)
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
