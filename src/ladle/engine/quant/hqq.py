"""Half-quadratic quantization (HQQ, Badri & Shaji 2023): calibration-free affine groups.

Each group of `group_size` input channels gets `w ~ (q - zero) * scale` with q in
`0..2^bits - 1`. The scale comes from the group's range; the zero point is then refined by
HQQ's proximal loop: the residual `W - W_r` is pushed through a generalized soft-threshold
(an l_p "shrink", p = 0.7, promoting a sparse error: a few outliers may be off as long as the
rest fit), and the zero point is re-solved in closed form as the mean that fits what is
left. `beta` grows each step (kappa = 1.01); the loop stops when the mean absolute error
stops falling. Parameters are HQQ's published defaults (`optimize_weights_proximal_legacy`).

The result is not a GGML type: HQQ's zero points are floats per group of 64, which no GGML
block stores, so `ladle quantize` cannot write it. HQQ4 runs on the int4 kernel
(`int4.Int4Weight`, group 64); HQQ8 has no CPU kernel taking float zero points per group, so
its weight is dequantized once (see `layers/linear.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladle.engine.quant.search import one_thread

GROUP_SIZE = 64
_LP_NORM = 0.7
_BETA = 10.0
_KAPPA = 1.01
_ITERS = 20


@dataclass(slots=True)
class HQQWeight:
    """`weight ~ (q - zero) * scale` per group of `group_size` input channels."""

    q: torch.Tensor  # uint8 [out, in], 0..2^bits - 1
    scale: torch.Tensor  # fp32 [out, in / group_size]
    zero: torch.Tensor  # fp32 [out, in / group_size]
    bits: int
    group_size: int = GROUP_SIZE

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        groups = self.q.reshape(n, -1, self.group_size).float()
        w = (groups - self.zero[..., None]) * self.scale[..., None]
        return w.reshape(n, k).to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))


def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> HQQWeight:
    """Quantize `[out, in]` (in a multiple of `group_size`) to `bits` with HQQ's zero points."""
    with one_thread():
        return _hqq(weight, bits, group_size)


def _hqq(weight: torch.Tensor, bits: int, group_size: int) -> HQQWeight:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"{k} input features are not a multiple of HQQ's group of {group_size}")
    qmax = 2**bits - 1
    w = weight.detach().float().reshape(n, -1, group_size)
    lo = w.amin(-1, keepdim=True)
    hi = w.amax(-1, keepdim=True)
    inv_scale = qmax / (hi - lo).clamp_min(1e-8)  # HQQ works with the inverse scale
    zero = -lo * inv_scale
    beta = _BETA
    best_error = torch.full_like(zero, float("inf"))
    best_zero = zero
    for _ in range(_ITERS):
        q = (w * inv_scale + zero).round().clamp(0, qmax)
        w_r = (q - zero) / inv_scale
        error = (w - w_r).abs().mean(-1, keepdim=True)
        improved = error < best_error  # per group: keep the zero point of its best step
        best_error = torch.where(improved, error, best_error)
        best_zero = torch.where(improved, zero, best_zero)
        if not bool(improved.any()):
            break
        w_e = _shrink_lp(w - w_r, beta)
        zero = (q - (w - w_e) * inv_scale).mean(-1, keepdim=True)
        beta *= _KAPPA
    q = (w * inv_scale + best_zero).round().clamp(0, qmax).to(torch.uint8)
    return HQQWeight(q.reshape(n, k), (1 / inv_scale)[..., 0], best_zero[..., 0], bits, group_size)


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal operator of the l_p (p < 1) norm."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - (1 / beta) * (magnitude + 1e-8).pow(_LP_NORM - 1))
