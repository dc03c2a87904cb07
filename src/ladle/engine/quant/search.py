"""Weighted scale searches shared by the GGML quantizers, vectorized over blocks.

They follow llama.cpp (`make_qx_quants`, `make_qkx2_quants` / `make_qkx3_quants`,
`make_qp_quants`): try a grid of candidate scales for every block at once, round, solve the
weighted least-squares scale (and offset) for those integers, and keep per block the candidate
whose weighted error `sum w_i (x_i - q_i)^2` is least; the plain max (or min/max) fit is
always one of the candidates. The loops run over the candidates, never over blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the searches on one torch thread, then restore the count.

    They are hundreds of mid-sized elementwise ops, each a parallel region: on a busy machine
    every region waits for a second core (measured on 2 shared cores, load 6-9: Q4_K on
    256x1024 took 3.6 s on 2 threads, 40 ms on 1). torch's OpenMP thread count belongs to the
    calling thread, so re-quantizing on a worker thread leaves the engine thread's alone.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def importance(
    x: torch.Tensor, imatrix: torch.Tensor | None, sigma_scale: float = 1.0
) -> torch.Tensor:
    """Per-weight error weights for rows `x` [rows, k], as llama.cpp's `quant_weights` path.

    With an importance matrix (mean squared activation per input channel, [k]) the weight is
    `imatrix_i * sqrt(sigma2 + x_i^2)`; without, `rms(row) + |x_i|`, which favours the large
    values that dominate a dot product.
    """
    x2 = x * x
    if imatrix is None:
        return x2.mean(dim=-1, keepdim=True).sqrt() + x.abs()
    sigma2 = sigma_scale * x2.mean(dim=-1, keepdim=True)
    return imatrix.to(x.dtype) * (sigma2 + x2).sqrt()


def symmetric_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """Best scale `d` per block of `x` [blocks, n] for `q = clamp(round(x / d), -nmax, nmax - 1)`.

    Candidates start from llama.cpp's reference (`d = max / -nmax`, with `max` the signed value
    of largest magnitude) and scan +-0.9 around `nmax`; zero blocks get `d = 0`.
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    signed_max = x.gather(-1, idx)  # [blocks, 1]
    safe_max = torch.where(signed_max == 0, torch.ones_like(signed_max), signed_max)
    wx = w * x
    best_scale = signed_max / -nmax
    best_score = torch.full_like(signed_max, -1.0)
    for step in range(-9, 10):
        q = (x * (-(nmax + 0.1 * step) / safe_max)).round_().clamp_(-nmax, nmax - 1)
        sum_lx = (wx * q).sum(-1, keepdim=True)
        sum_l2 = (w * q).mul_(q).sum(-1, keepdim=True).clamp_min_(1e-30)
        score = sum_lx * sum_lx / sum_l2  # the error falls as this rises (llama.cpp)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sum_lx / sum_l2, best_scale)
    return torch.where(signed_max == 0, torch.zeros_like(best_scale), best_scale)


# (rmin, rdelta, steps): the candidate inverse scales are (nmax + rmin + rdelta i) / span
AffineGrid = tuple[float, float, int]
PLAIN_GRID: AffineGrid = (-1.0, 0.1, 20)  # llama.cpp's make_qkx2_quants, without an imatrix
IMATRIX_GRID: AffineGrid = (-0.9, 0.05, 36)  # make_qkx3_quants, as llama.cpp runs with one


def affine_scale_min(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    grid: AffineGrid = PLAIN_GRID,
    signed_min: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best `(scale, min)` per block for `x ~ scale * q + min`, `q` in `0..nmax`.

    llama.cpp's `make_qkx2_quants` (or `make_qkx3_quants`, with `IMATRIX_GRID`): for each
    candidate inverse scale, round, then solve the 2x2 weighted least squares for scale and
    offset. The offset is clamped to <= 0 (K-quants store `-min` unsigned) unless
    `signed_min` (Q4_1 stores it as a signed fp16). Errors come from the block sums alone,
    with no second pass over x.
    """
    lo = x.amin(dim=-1, keepdim=True)
    if not signed_min:
        lo = lo.clamp_max(0.0)
    hi = x.amax(dim=-1, keepdim=True)
    span = (hi - lo).clamp_min(1e-30)
    shifted = x - lo
    wx = w * x
    sum_w = w.sum(-1, keepdim=True)
    sum_x = wx.sum(-1, keepdim=True)
    sum_x2 = (wx * x).sum(-1, keepdim=True)
    best_scale, best_min = span / nmax, lo
    best_err = torch.full_like(lo, float("inf"))
    rmin, rdelta, steps = grid
    for step in range(-1, steps + 1):  # -1: the plain min/max fit, as llama.cpp starts
        iscale = (nmax / span) if step < 0 else (rmin + rdelta * step + nmax) / span
        q = (shifted * iscale).round_().clamp_(0, nmax)
        wq = w * q
        sum_l = wq.sum(-1, keepdim=True)
        sum_l2 = (wq * q).sum(-1, keepdim=True)
        sum_xl = (wx * q).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        if not signed_min:  # an offset above 0: refit the scale alone with the offset at 0
            positive = mn > 0
            scale = torch.where(positive, sum_xl / sum_l2.clamp_min(1e-30), scale)
            mn = torch.where(positive, torch.zeros_like(mn), mn)
        # sum w (scale q + mn - x)^2, expanded over the sums
        err = (
            scale * scale * sum_l2
            + 2 * scale * mn * sum_l
            - 2 * scale * sum_xl
            + mn * mn * sum_w
            - 2 * mn * sum_x
            + sum_x2
        )
        better = (det > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, mn, best_min)
    flat = hi == lo
    return torch.where(flat, torch.zeros_like(best_scale), best_scale), best_min


def positive_grid(
    values: torch.Tensor, weights: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative `values` [blocks, n] to `d * L`, `L` in `0..nmax`, per block.

    llama.cpp's `make_qp_quants`, which its imatrix paths use for a K-quant's 6-bit group
    scales and mins: try inverse scales `(nmax + 0.1 i) / max` for i in -4..4 under the
    weighted error, then move one `L` at a time while the least-squares fit improves, and
    return that fit's `d` [blocks, 1] with the integers `L` [blocks, n] (float). Zero blocks
    get `d = 0`.
    """
    top = values.amax(dim=-1, keepdim=True)
    safe_top = torch.where(top > 1e-15, top, torch.ones_like(top))
    best_iscale = nmax / safe_top
    best_err = torch.full_like(top, float("inf"))
    for step in range(-4, 5):
        iscale = (nmax + 0.1 * step) / safe_top
        levels = (values * iscale).round_().clamp_(max=nmax)
        err = (weights * (values - levels / iscale) ** 2).sum(-1, keepdim=True)
        better = err < best_err  # step 0 (the plain max fit) is tried first among equals
        best_err = torch.where(better, err, best_err)
        best_iscale = torch.where(better, iscale, best_iscale)
    levels = (values * best_iscale).round_().clamp_(max=nmax)
    sum_lx = (weights * values * levels).sum(-1)
    sum_l2 = (weights * levels * levels).sum(-1)
    for _ in range(5):  # llama.cpp's refinement: each level in turn, if the fit improves
        for i in range(values.shape[-1]):
            w, v, level = weights[:, i], values[:, i], levels[:, i]
            rest_lx = sum_lx - w * v * level
            rest_l2 = sum_l2 - w * level * level
            can_move = (rest_lx > 0) & (rest_l2 > 0)
            moved = (v * rest_l2 / torch.where(can_move, rest_lx, 1.0)).round_().clamp_(max=nmax)
            new_lx = rest_lx + w * v * moved
            new_l2 = rest_l2 + w * moved * moved
            better = (
                can_move & (moved != level) & (new_lx * new_lx * sum_l2 > sum_lx * sum_lx * new_l2)
            )
            levels[:, i] = torch.where(better, moved, level)
            sum_lx = torch.where(better, new_lx, sum_lx)
            sum_l2 = torch.where(better, new_l2, sum_l2)
    d = torch.where(sum_l2 > 0, sum_lx / sum_l2.clamp_min(1e-30), torch.zeros_like(sum_l2))
    return torch.where(top[:, 0] > 1e-15, d, torch.zeros_like(d))[:, None], levels
