"""Q4_0 / Q4_1 / Q4_K map exactly onto torch's group-32 int4 form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int4 import can_pack_int4, pack_int4, unpack_int4

T = GGMLQuantizationType
Q4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)


def random_q4(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random nibbles and 6-bit scales; f16 d (and m / dmin) finite and modest."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in (0,) if ggml_type == T.Q4_0 else (0, 2):
        scale = rng.uniform(1e-3, 2e-2, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
        blocks[..., offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return GGMLTensor("w", ggml_type, blocks.reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("ggml_type", Q4_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("rows", "cols"), [(16, 256), (96, 768), (32, 1536)])
def test_unpacked_groups_reproduce_dequantize(ggml_type: T, rows: int, cols: int) -> None:
    w = random_q4(ggml_type, rows, cols)
    q, scale, zero = unpack_int4(w)
    assert q.shape == (rows, cols) and q.max() <= 15
    assert scale.shape == zero.shape == (rows, cols // 32)
    groups = (q.reshape(rows, -1, 32).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    ref = w.dequantize().numpy()
    np.testing.assert_allclose(
        groups.reshape(rows, cols), ref, rtol=0, atol=1e-6 * np.abs(ref).max()
    )


def test_q4_k_scales_unpack_like_ggml() -> None:
    """Values above 63 in bytes 0..7 carry the top bits of groups 4..7 (get_scale_min_k4)."""
    w = random_q4(T.Q4_K, 16, 256)
    w.data[:, 4:16] = [0xC1, 0x42, 0x83, 0x04, 0x45, 0xC6, 0x07, 0x88, 0x9A, 0xBC, 0xDE, 0xF0]
    w.data[:, 0:4] = np.array([1.0, 0.5], dtype=np.float16).view(np.uint8)  # d = 1, dmin = 0.5
    _, scale, zero = unpack_int4(w)
    sc = [1, 2, 3, 4, 0x3A, 0x1C, 0x2E, 0x00]  # e.g. group 4: (0x9A & 0xF) | (0xC1 >> 6) << 4
    mins = [5, 6, 7, 8, 0x19, 0x3B, 0x0D, 0x2F]  # e.g. group 4: (0x9A >> 4) | (0x45 >> 6) << 4
    np.testing.assert_array_equal(scale[0], sc)
    np.testing.assert_array_equal(zero[0], 8.0 * np.array(sc) - 0.5 * np.array(mins))


@pytest.mark.parametrize("ggml_type", Q4_TYPES, ids=lambda t: t.name)
def test_pack_int4_layout(ggml_type: T) -> None:
    packed = pack_int4(random_q4(ggml_type, 96, 768))
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (96, 384)
    assert packed.scales_and_zeros.dtype == torch.bfloat16
    assert packed.scales_and_zeros.shape == (768 // 32, 96, 2)


def test_matmul_keeps_input_dtype_and_leading_dims() -> None:
    packed = pack_int4(random_q4(T.Q4_K, 32, 256))
    y = packed.matmul(torch.randn(2, 3, 256))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 32)


def test_can_pack_int4_needs_a_q4_type_and_rows_in_sixteens() -> None:
    assert all(can_pack_int4(random_q4(t, 48, 256)) for t in Q4_TYPES)
    assert not can_pack_int4(random_q4(T.Q4_0, 40, 256))  # torch's packer wants N % 16 == 0
    q8 = GGMLTensor("w", T.Q8_0, np.zeros((48, 8 * 34), dtype=np.uint8), (48, 256))
    assert not can_pack_int4(q8)
