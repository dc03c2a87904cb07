"""HQQ's zero-point refinement, and its int4 kernel layout."""

from __future__ import annotations

import torch

from ladle.engine.layers.linear import Linear
from ladle.engine.quant.hqq import hqq_quantize


def weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[torch.rand(64, 256, generator=g) < 0.005] *= 8
    return w


def min_max_affine(w: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, group)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    q = ((groups - lo) / scale).round()
    return (q * scale + lo).reshape(w.shape)


def test_hqq_beats_min_max_rounding() -> None:
    w = weights()
    for bits in (4, 8):
        hqq = hqq_quantize(w, bits)
        assert hqq.q.dtype == torch.uint8 and int(hqq.q.max()) <= 2**bits - 1
        assert hqq.scale.shape == (64, 4)
        ours = (hqq.dequantize() - w).abs().mean()
        baseline = (min_max_affine(w, bits) - w).abs().mean()
        assert ours < baseline


def test_hqq4_runs_on_the_int4_kernel_group_64() -> None:
    w = weights()
    hqq = hqq_quantize(w, 4)
    layer = Linear(256, 64)
    layer.load_weight(hqq, torch.float32)
    assert layer.int4 is not None and layer.int4.group_size == 64
    x = torch.randn(3, 256)
    ref = x @ hqq.dequantize().T
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 1e-2


def test_hqq8_is_dequantized_once() -> None:
    hqq = hqq_quantize(weights(), 8)
    layer = Linear(256, 64)
    layer.load_weight(hqq, torch.float32)
    assert layer.int4 is None and layer.int8 is None
    assert torch.equal(layer.weight, hqq.dequantize())
