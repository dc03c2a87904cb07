"""Linear gives `x W^T + b` whether W is dense, dequantized or int4-packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from ladle.engine.kernels import native
from ladle.engine.layers.linear import Linear
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.quant.ggml import GGMLStack, GGMLTensor
from ladle.errors import ModelLoadError

T = GGMLQuantizationType

# int4 outputs differ from fp32 by the bf16 rounding of the activations and of each group's
# scale and zero (2^-9 relative each): ~3e-3 in practice, so 1e-2 leaves room but catches any
# layout mistake (a swapped nibble or group gives errors of order 1).
INT4_RTOL = 1e-2


def random_q4(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random nibbles and 6-bit scales; f16 d (and m / dmin) finite and modest."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in (0,) if ggml_type == T.Q4_0 else (0, 2):
        scale = rng.uniform(1e-3, 2e-2, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
        blocks[..., offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return GGMLTensor("w", ggml_type, blocks.reshape(rows, -1), (rows, cols))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("x_shape", [(1,), (7,), (2, 3)], ids=str)
def test_int4_matches_dequantized_reference(ggml_type: T, x_shape: tuple[int, ...]) -> None:
    n, k = 96, 256 * 3
    w = random_q4(ggml_type, n, k)
    bias = torch.randn(n)
    layer = Linear(k, n, bias=True)
    layer.load_weight(w, torch.float32, bias)
    assert layer.int4 is not None and layer.weight is None
    x = torch.randn(*x_shape, k)
    y = layer(x)
    assert y.shape == (*x_shape, n) and y.dtype == torch.float32
    ref = x @ w.dequantize().T + bias
    assert relative_error(y, ref) < INT4_RTOL


def test_int4_falls_back_to_dense_when_rows_are_not_in_sixteens() -> None:
    w = random_q4(T.Q4_1, 40, 256)
    layer = Linear(256, 40)
    layer.load_weight(w, torch.float32)
    assert layer.int4 is None and "dense" in repr(layer)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ w.dequantize().T)


def test_other_ggml_types_are_dequantized_once() -> None:
    """A Q5_0 weight whose rows do not fill the native kernel's blocks of 16 is decoded."""
    values = np.random.default_rng(0).standard_normal((40, 64), dtype=np.float32)
    w = GGMLTensor("w", T.Q5_0, quantize(values, T.Q5_0), (40, 64))
    layer = Linear(64, 40)
    layer.load_weight(w, torch.bfloat16)
    assert layer.int4 is None and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, w.dequantize(torch.bfloat16))


def test_mixed_types_fused_run_each_part_on_its_kernel() -> None:
    """Q4_K_M's q and k in Q4_K beside v in Q6_K: one stacked call, each part in its blocks,
    no dense copy; the output is the parts' dequantized products side by side."""
    k = 256
    q, key = random_q4(T.Q4_K, 32, k, seed=1), random_q4(T.Q4_K, 16, k, seed=2)
    rng = np.random.default_rng(3)  # Q6_K: random bytes, its f16 d (at byte 208) modest
    blocks = rng.integers(0, 256, (16, GGML_QUANT_SIZES[T.Q6_K][1]), dtype=np.uint8)
    blocks[:, 208:210] = rng.uniform(1e-3, 2e-2, (16, 1)).astype(np.float16).view(np.uint8)
    v = GGMLTensor("v", T.Q6_K, blocks, (16, k))
    stack = GGMLStack("qkv", [q, key, v])
    layer = Linear(k, 64, bias=True)
    bias = torch.randn(64)
    layer.load_weight(stack, torch.float32, bias)
    assert layer.weight is None and "stacked" in repr(layer)
    assert "int4" in repr(layer) and "int8" in repr(layer)
    layer.use_kernels = True
    kernel = layer.kernel_weight()
    assert kernel is not None and len(kernel.data) == 3 and kernel.rows == 64
    x = torch.randn(5, k)
    ref = x @ stack.dequantize().T + bias
    assert relative_error(layer(x), ref) < INT4_RTOL
    # the stacked call is the parts' own calls side by side, bit for bit
    each = [native.KernelWeight.of(d, sc) for d, sc in zip(kernel.data, kernel.scales, strict=True)]
    parts = torch.cat([native.linear(x, w) for w in each], dim=-1) + bias
    assert torch.equal(layer(x), parts)


def test_dense_weight_with_bias_is_f_linear() -> None:
    weight, bias, x = torch.randn(24, 32), torch.randn(24), torch.randn(2, 5, 32)
    layer = Linear(32, 24, bias=True)
    layer.load_weight(weight, torch.float32, bias)
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def test_wrong_shape_names_the_tensor() -> None:
    w = random_q4(T.Q4_0, 32, 256)
    w.name = "blk.0.ffn_up.weight"
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight: shape \(32, 256\)"):
        Linear(256, 64).load_weight(w, torch.float32)


@pytest.mark.real_model
def test_smollm2_q4_1_gate_matches_dense(smollm2_path) -> None:
    gate = read_gguf(smollm2_path).tensors["blk.0.ffn_gate.weight"]
    assert gate.ggml_type == T.Q4_1 and gate.shape == (1536, 576)
    layer = Linear(576, 1536)
    layer.load_weight(gate, torch.float32)
    assert layer.int4 is not None
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    assert relative_error(layer(x), x @ gate.dequantize().T) < INT4_RTOL
