"""Q4_0 / Q4_1 / Q4_K map exactly onto torch's group-32 int4 form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ladle.engine.kernels import native
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int4 import (
    Int4Weight,
    NativeInt4Weight,
    can_pack_int4,
    pack_int4,
    pack_native4,
    pack_torch4,
    unpack_int4,
)

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
def test_pack_torch4_layout(ggml_type: T) -> None:
    packed = pack_torch4(
        *(torch.from_numpy(a) for a in unpack_int4(random_q4(ggml_type, 96, 768))), 32
    )
    assert isinstance(packed, Int4Weight)
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


needs_kernels = pytest.mark.skipif(
    not native.load(), reason="native kernels unavailable (no g++, a failed build, or disabled)"
)


def quantized_reference(x: torch.Tensor, packed: NativeInt4Weight, q: torch.Tensor) -> torch.Tensor:
    """`int4_linear`'s own arithmetic in float64: x in int16 per group of 32, exact group sums,
    the weight's fp16 scales and zeros as packed."""
    n_rows, k = x.shape
    groups = x.reshape(n_rows, k // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    xq = torch.round(groups * inv).double()  # half to even, as the kernel's nearbyint
    dx = (amax / 32767.0).double()[..., 0]  # [n, g]
    dots = torch.einsum("ngi,mgi->nmg", xq, q.double().reshape(q.shape[0], k // 32, 32))
    # scales [m / 16, g, 2, 16] -> scale, zero [m, g]
    s, z = (packed.scales[:, :, i].transpose(1, 2).reshape(q.shape[0], -1).double() for i in (0, 1))
    return (dots * s[None] * dx[:, None]).sum(-1) + groups.double().sum(-1) @ z.T


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize(("m", "k"), [(16, 32), (48, 576), (80, 96), (576, 1536)])
def test_native_int4_matches_its_arithmetic_and_the_dense_product(
    rows: int, m: int, k: int
) -> None:
    """Against its own arithmetic the kernel differs only by float32 sums (1e-5 of the
    outputs' size); against the dense product, by int16 activations: 1e-4 of that size at most
    (2e-5 is typical; torch's int4 kernel, with bf16 activations, is off by 4e-3)."""
    gen = torch.Generator().manual_seed(rows * 1000 + m)
    q = torch.randint(0, 16, (m, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(m, k // 32, generator=gen) * 0.02 + 1e-3
    zero = torch.randn(m, k // 32, generator=gen) * 0.05
    x = torch.randn(rows, k, generator=gen)
    x[0, :32] = 0.0  # a group of zeros: scale 0, no division by it
    packed = pack_native4(q, scale, zero + 8 * scale, 32)
    out = packed.matmul(x).double()
    size = out.abs().max()
    ref = quantized_reference(x, packed, q)
    assert (out - ref).abs().max() <= 1e-5 * size
    w = q.double().reshape(m, -1, 32) * scale.half().double()[..., None]
    dense = x.double() @ (w + zero.half().double()[..., None]).reshape(m, k).T
    assert (out - dense).abs().max() <= 1e-4 * size


@needs_kernels
def test_native_int4_rows_do_not_depend_on_the_batch_or_threads() -> None:
    """Each output is one fixed-order sum: a row alone, in a batch of 13, on 1 or 2 threads."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (96, 576), generator=gen, dtype=torch.uint8)
    packed = pack_native4(q, torch.rand(96, 18, generator=gen), torch.randn(96, 18), 32)
    x = torch.randn(13, 576, generator=gen)
    batch = packed.matmul(x)
    for i in range(13):
        assert torch.equal(packed.matmul(x[i : i + 1])[0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(packed.matmul(x), batch)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("ggml_type", Q4_TYPES, ids=lambda t: t.name)
def test_native_int4_packs_ggml_blocks(ggml_type: T) -> None:
    """A one-hot row reads one weight column back: the GGML dequantization, to fp16 scales."""
    w = random_q4(ggml_type, 48, 512)
    packed = pack_int4(w)
    assert isinstance(packed, NativeInt4Weight)
    assert packed.q.shape == (3, 256, 16) and packed.scales.shape == (3, 16, 2, 16)
    read = packed.matmul(torch.eye(512)).T
    ref = w.dequantize()
    torch.testing.assert_close(read, ref, rtol=0, atol=1e-3 * ref.abs().max().item())


@needs_kernels
def test_native_int4_rejects_mismatched_shapes() -> None:
    packed = pack_native4(
        torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2), 32
    )
    with pytest.raises(ValueError, match="x has 96 features, the weight 64"):
        packed.matmul(torch.zeros(2, 96))
    with pytest.raises(ValueError, match=r"no packed form is torch.uint8 .* in groups of 64"):
        native.KernelWeight.of(packed.q, packed.scales[:, :1].contiguous())
