"""The weighted searches of `search.py` on random blocks, against their plain starting points."""

from __future__ import annotations

import pytest
import torch

from ladle.engine.quant.search import IMATRIX_GRID, affine_scale_min, positive_grid


@pytest.mark.parametrize("nmax", [15, 63])
def test_positive_grid_beats_rounding_against_the_maximum(nmax: int) -> None:
    """llama.cpp's `make_qp_quants` (a K-quant's 6-bit scales under an imatrix): never a
    larger weighted error than `d = max / nmax` with rounded levels, block by block."""
    g = torch.Generator().manual_seed(nmax)
    values = torch.rand(2000, 8, generator=g) ** 2
    values[:5] = 0.0  # all-zero blocks
    weights = torch.exp(torch.randn(2000, 8, generator=g) * 2)
    d, levels = positive_grid(values, weights, nmax)
    assert levels.min() >= 0 and levels.max() <= nmax and bool((levels == levels.round()).all())
    assert bool((d[:5] == 0).all())
    plain_d = values.amax(-1, keepdim=True) / nmax
    plain = (values / plain_d.clamp_min(1e-30)).round()
    err = (weights * (values - d * levels) ** 2).sum(-1)
    plain_err = (weights * (values - plain_d * plain) ** 2).sum(-1)
    assert bool((err <= plain_err * (1 + 1e-5) + 1e-12).all())
    assert err.sum() < 0.9 * plain_err.sum()


def test_affine_fit_is_no_worse_than_the_min_max_fit() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g)
    w = torch.exp(torch.randn(4000, 32, generator=g))
    scale, mn = affine_scale_min(x, w, 15, IMATRIX_GRID, signed_min=True)
    q = ((x - mn) / scale).round().clamp(0, 15)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    plain = ((x - lo) / (hi - lo) * 15).round()
    err = (w * (scale * q + mn - x) ** 2).sum(-1)
    plain_err = (w * ((hi - lo) / 15 * plain + lo - x) ** 2).sum(-1)
    assert bool((err <= plain_err * (1 + 1e-4)).all())
