"""Every ISQ weight form in `Linear`: kernel chosen, output close to the dequantized matmul."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from ladle.engine.layers.linear import Linear
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.ggml_quantize import quantize

T = GGMLQuantizationType


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


# (form the layer holds, tolerance vs the fp32 matmul of the dequantized weight): int4 rounds
# activations and scales to bf16 (~3e-3); int8 re-rounds Q8_0 per row and quantizes
# activations (~1.1e-2); Q5_K and Q6_K on the native int8 kernel round their group scales to
# fp16 once (measured 2.8e-4 and 7.9e-5); 16-bit types cast activations (~3e-3)
CASES = {
    T.Q4_0: ("int4", 1e-2),
    T.Q4_1: ("int4", 1e-2),
    T.Q4_K: ("int4", 1e-2),
    T.Q8_0: ("int8", 2.5e-2),
    T.Q5_K: ("int8", 2e-3),
    T.Q6_K: ("int8", 2e-3),
    T.F16: ("dense", 1e-2),
    T.BF16: ("dense", 1e-2),
}


@pytest.mark.parametrize("ggml_type", list(CASES), ids=lambda t: t.name)
def test_each_type_picks_its_kernel(ggml_type: T) -> None:
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(96, 512, generator=g) * 0.02, ggml_type)
    bias = torch.randn(96, generator=g)
    layer = Linear(512, 96, bias=True)
    layer.load_weight(w, torch.float32, bias)
    kind, tolerance = CASES[ggml_type]
    assert kind in repr(layer)
    x = torch.randn(2, 3, 512, generator=g)
    ref = x @ w.dequantize().T + bias
    y = layer(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float32
    assert relative_error(y, ref) < tolerance
    assert relative_error(layer.dequantized(), w.dequantize()) < tolerance


def test_sixteen_bit_weights_keep_their_dtype() -> None:
    w = torch.randn(32, 64)
    for ggml_type, dtype in ((T.F16, torch.float16), (T.BF16, torch.bfloat16)):
        layer = Linear(64, 32)
        layer.load_weight(quantize(w, ggml_type), torch.float32)
        assert layer.weight is not None and layer.weight.dtype == dtype


def test_calibration_sums_squared_inputs_only_while_set() -> None:
    layer = Linear(8, 16)
    layer.load_weight(torch.randn(16, 8), torch.float32)
    x = torch.randn(2, 5, 8)
    layer(x)
    layer.calibration = ActivationStats(8)
    layer(x)
    layer(x[0])
    assert layer.calibration.rows == 15
    expected = (x * x).sum((0, 1)) + (x[0] * x[0]).sum(0)
    torch.testing.assert_close(layer.calibration.sum_sq.float(), expected)
