"""Q8_0 on ladle's int8 kernel: the file's own values, float32 activations (int16 inside).

The other types the kernel takes (Q5_0, Q5_1, Q5_K, Q6_K) are tested in test_kquants.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from ladle.engine.kernels import native
from ladle.engine.layers.linear import Linear
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int8 import NativeInt8Weight, can_pack_native8, pack_ggml8

pytestmark = pytest.mark.skipif(
    not native.load(), reason="native kernels unavailable (no g++, a failed build, or disabled)"
)


def random_q8_0(rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    rng = np.random.default_rng(seed)
    blocks = np.empty((rows, cols // 32, 34), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, (rows, cols // 32)).astype(np.float16)
    blocks[..., :2] = d[..., None].view(np.uint8)
    blocks[..., 2:] = rng.integers(-128, 128, (rows, cols // 32, 32), dtype=np.int8).view(np.uint8)
    return GGMLTensor("w", GGMLQuantizationType.Q8_0, blocks.reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("rows", [1, 5, 9])
@pytest.mark.parametrize(("m", "k"), [(16, 32), (80, 576), (48, 1536)])
def test_native_int8_is_the_q8_0_product(rows: int, m: int, k: int) -> None:
    """The weight is used exactly; int16 activations keep outputs within 1e-4 of their size
    (2e-5 is typical)."""
    w = random_q8_0(m, k, seed=m + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = pack_ggml8(w).matmul(x).double()
    exact = x.double() @ w.dequantize().double().T
    assert (out - exact).abs().max() <= 1e-4 * exact.abs().max()


def test_native_int8_rows_are_the_dequantized_table() -> None:
    w = random_q8_0(64, 96)
    packed = pack_ggml8(w)
    ids = torch.tensor([[0, 17, 63], [5, 5, 32]])
    assert torch.equal(packed.rows(ids), w.dequantize()[ids])


def test_q8_0_linear_and_its_identity_readback_use_the_native_kernel() -> None:
    w = random_q8_0(32, 64)
    layer = Linear(64, 32)
    layer.load_weight(w, torch.float32)
    assert isinstance(layer.int8, NativeInt8Weight)
    ref = w.dequantize()
    torch.testing.assert_close(layer.dequantized(), ref, rtol=1e-6, atol=1e-7)


def test_only_8_bit_groups_with_rows_in_sixteens_pack() -> None:
    """Q8_0 (and Q5_0 / Q5_1 / Q5_K / Q6_K: test_kquants.py), not 4-, 2- or 3-bit types."""
    assert can_pack_native8(random_q8_0(32, 64))
    assert not can_pack_native8(random_q8_0(24, 64))
    q4 = GGMLTensor("w", GGMLQuantizationType.Q4_0, np.zeros((16, 36), np.uint8), (16, 64))
    q3 = GGMLTensor("w", GGMLQuantizationType.Q3_K, np.zeros((16, 110), np.uint8), (16, 256))
    assert not can_pack_native8(q4) and not can_pack_native8(q3)


def test_native_int8_rejects_a_wrong_layout() -> None:
    packed = pack_ggml8(random_q8_0(16, 64))
    with pytest.raises(ValueError, match="x has 32 features, the weight 64"):
        packed.matmul(torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"no packed form is torch\.uint8"):
        native.KernelWeight.of(packed.q.view(torch.uint8), packed.scales)
