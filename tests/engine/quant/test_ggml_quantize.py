"""Quantizers write GGML blocks the `gguf` package decodes, within each format's error bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize

from ladle.engine.quant.ggml_quantize import error_weights, quantize

T = GGMLQuantizationType

# Relative RMS error on Gaussian weights with a few outliers. llama.cpp's own figures on such
# data are about 0.5% (Q8_0), 2% (Q6_K), 4% (Q5_K), 8% (Q4_K), 8-10% (Q4_1, Q4_0).
BOUNDS = {
    T.F16: 1e-3,
    T.BF16: 5e-3,
    T.Q8_0: 0.008,
    T.Q6_K: 0.025,
    T.Q5_K: 0.05,
    T.Q4_K: 0.095,
    T.Q4_1: 0.095,
    T.Q4_0: 0.11,
}


def weights(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.002] *= 8  # outliers, as real weights have
    return w


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("ggml_type", list(BOUNDS), ids=lambda t: t.name)
def test_round_trip_matches_gguf_reference_within_bound(ggml_type: T) -> None:
    w = weights()
    q = quantize(w, ggml_type)
    assert q.ggml_type == ggml_type and q.shape == tuple(w.shape)
    reference = torch.from_numpy(dequantize(q.data, ggml_type)).reshape(w.shape)
    assert torch.equal(reference, q.dequantize())
    assert rel_rmse(reference, w) < BOUNDS[ggml_type]


def test_q8_0_error_is_half_a_step_per_block() -> None:
    w = weights()
    err = (quantize(w, T.Q8_0).dequantize() - w).abs().reshape(-1, 32)
    step = w.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
    assert bool((err <= step * 0.5 * 1.002 + 1e-9).all())  # + fp16 rounding of the scale


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_no_worse_than_the_gguf_reference_quantizer(ggml_type: T) -> None:
    w = weights()
    ours = rel_rmse(quantize(w, ggml_type).dequantize(), w)
    ref_blocks = gguf_quantize(w.numpy(), ggml_type)
    ref = rel_rmse(torch.from_numpy(dequantize(ref_blocks, ggml_type)).reshape(w.shape), w)
    assert ours <= ref * 1.001


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_zero_rows_stay_zero(ggml_type: T) -> None:
    w = weights(16, 256)
    w[3] = 0
    out = quantize(w, ggml_type).dequantize()
    assert bool(torch.isfinite(out).all()) and bool((out[3] == 0).all())


@pytest.mark.parametrize(
    "ggml_type", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name
)
def test_importance_matrix_lowers_activation_weighted_error(ggml_type: T) -> None:
    g = torch.Generator().manual_seed(1)
    cols = 512
    channel_scale = torch.exp(torch.randn(cols, generator=g) * 1.5)  # uneven channels
    calib = torch.randn(256, cols, generator=g) * channel_scale
    held_out = torch.randn(256, cols, generator=g) * channel_scale
    imatrix = (calib * calib).mean(0)
    w = weights(64, cols)

    def output_error(q: torch.Tensor) -> float:
        return ((held_out @ (q - w).T).norm() / (held_out @ w.T).norm()).item()

    plain = output_error(quantize(w, ggml_type).dequantize())
    weighted = output_error(quantize(w, ggml_type, imatrix).dequantize())
    assert weighted < plain * 0.95


def test_errors_name_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"blk\.0: 100 input features"):
        quantize(torch.zeros(4, 100), T.Q4_K, name="blk.0")
    with pytest.raises(ValueError, match="cannot quantize to Q2_K"):
        quantize(torch.zeros(4, 256), T.Q2_K)
    with pytest.raises(ValueError, match="importance matrix of shape"):
        quantize(torch.zeros(4, 256), T.Q4_0, torch.ones(3))


def test_dense_types_are_the_bytes_of_the_cast() -> None:
    w = weights(4, 64)
    q = quantize(w, T.BF16)
    assert np.array_equal(q.data.reshape(-1), w.bfloat16().view(torch.uint8).numpy().reshape(-1))


def block_errors(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor, ggml_type: T) -> torch.Tensor:
    return (w * (q - x) ** 2).reshape(-1, GGML_QUANT_SIZES[ggml_type][0]).sum(-1)


@pytest.mark.parametrize("spread", [0.5, 2.0, 5.0])
@pytest.mark.parametrize(
    "ggml_type", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name
)
def test_weighted_is_never_worse_than_plain_under_its_own_weights(
    ggml_type: T, spread: float
) -> None:
    """Block by block, under the weighted error the search minimizes, the imatrix-weighted
    result beats (or ties) the unweighted one and llama.cpp's plain rounding (`gguf`'s
    reference quantizer, for the types it has); importance spans e^(+-3 spread), with dead
    channels, as real activations do."""
    g = torch.Generator().manual_seed(int(spread * 10))
    w = weights(64, 512, seed=int(spread))
    imatrix = torch.exp(torch.randn(512, generator=g) * spread)
    imatrix[torch.rand(512, generator=g) < 0.05] = 0.0
    own = error_weights(w, imatrix, ggml_type)
    weighted = block_errors(w, quantize(w, ggml_type, imatrix).dequantize(), own, ggml_type)
    plain = block_errors(w, quantize(w, ggml_type).dequantize(), own, ggml_type)
    assert bool((weighted <= plain).all())
    if ggml_type in (T.Q4_0, T.Q4_1, T.Q8_0):
        ref = dequantize(gguf_quantize(w.numpy(), ggml_type), ggml_type)
        rounded = block_errors(w, torch.from_numpy(ref).reshape(w.shape), own, ggml_type)
        worse = weighted > rounded
        assert not bool(worse.any()), (weighted[worse] / rounded[worse]).max()


def test_requantizing_a_q4_1_grid_with_an_imatrix_gives_it_back() -> None:
    """SmolLM2's case (Q4K falls back to Q4_1 on its 576-wide layers): weights already on a
    Q4_1 grid come back byte for byte, even when importance spans e^(+-15)."""
    g = torch.Generator().manual_seed(3)
    source = quantize(weights(64, 512), T.Q4_1)
    imatrix = torch.exp(torch.randn(512, generator=g) * 5.0)
    again = quantize(source.dequantize(), T.Q4_1, imatrix)
    assert np.array_equal(again.data, source.data)
