"""GGML's 5-, 6- and 8-bit types on the native int8 kernel: the file's integers, unchanged.

Tolerances. Q8_0's, Q5_0's and Q5_1's scales and zeros are the file's own fp16 numbers, so
the packed weight is the reference's exactly. Q5_K's d * sc and dmin * m and Q6_K's d * sc are
exact in float32 but rounded once to fp16 when packed: each is off by at most half an fp16
ulp, 2^-11 of its size (a result in fp16's subnormal range is a multiple of 2^-24, as d is,
and exact), so a weight is off by at most 2^-11 (|q d sc| + |dmin m|); each side's own
float32 sum adds 2^-24 of the weight. Through the kernel, the activations' int16 adds 1e-4 of
the outputs' size at most (2e-5 typical, as in test_int8.py), on top of the weights' bound
summed over k.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as reference_quantize

from ladle.engine.kernels import native
from ladle.engine.layers.embedding import HEAD_DTYPE, Embedding, LMHead, tie_lm_head
from ladle.engine.layers.linear import Linear
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.ggml_blocks import Int8Groups, unpack_int8
from ladle.engine.quant.ggml_quantize import quantize
from ladle.engine.quant.int8 import (
    NativeInt8Weight,
    can_pack_native8,
    pack_ggml8,
    pack_native6,
    pack_native8,
)

T = GGMLQuantizationType
# the fp16 fields (d, and m / dmin) of each block, by byte offset (ggml-common.h)
F16_FIELDS = {T.Q8_0: (0,), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
TYPES = tuple(F16_FIELDS)
EXACT = (T.Q8_0, T.Q5_0, T.Q5_1)  # packed with the file's own fp16 constants
Q_RANGES = {
    T.Q8_0: (-128, 127), T.Q5_0: (-16, 15), T.Q5_1: (0, 31), T.Q5_K: (0, 31), T.Q6_K: (-32, 31),
}  # fmt: skip
HALF_ULP = 2.0**-11  # fp16 rounding, relative
SUM_ROUNDING = 2.0**-24  # one float32 rounding, relative
ACTIVATION_INT16 = 1e-4  # of the outputs' size

needs_kernels = pytest.mark.skipif(
    not native.load(), reason="native kernels unavailable (no g++, a failed build, or disabled)"
)


def random_blocks(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random bytes (every bit pattern of q, sc and m) with finite, modest fp16 fields."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[ggml_type]:
        scale = rng.uniform(1e-3, 2e-2, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
        blocks[..., offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return GGMLTensor("w", ggml_type, blocks.reshape(rows, -1), (rows, cols))


def quantized(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Gaussian weights of a trained model's size (0.02) as a file stores them: Q6_K's d is
    then an fp16 subnormal."""
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    if ggml_type in (T.Q5_0, T.Q5_1):  # ladle quantizes only the types its ISQ writes
        data = reference_quantize(dense.numpy(), ggml_type)
        return GGMLTensor("w", ggml_type, data.reshape(rows, -1), (rows, cols))
    return quantize(dense, ggml_type)


SOURCES = {"random_bytes": random_blocks, "quantized": quantized}


def reference(w: GGMLTensor) -> torch.Tensor:
    return torch.from_numpy(dequantize(w.data, w.ggml_type).reshape(w.shape))


def groups_value(groups: Int8Groups) -> torch.Tensor:
    """`q * scale + zero` in float32, in the reference's order of operations."""
    q, scale, zero, group = groups
    n, k = q.shape
    value = q.float().reshape(n, -1, group) * scale[..., None]
    if zero is not None:
        value = value + zero[..., None]
    return value.reshape(n, k)


def weight_bound(w: GGMLTensor) -> torch.Tensor:
    """How far each packed weight may be from the reference (see the module docstring)."""
    q, scale, zero, group = unpack_int8(w)
    n, k = q.shape
    size = (q.double().reshape(n, -1, group) * scale.double()[..., None]).abs()
    if zero is not None:
        size = size + zero.double().abs()[..., None]
    rounding = 0.0 if w.ggml_type in EXACT else HALF_ULP
    return rounding * size.reshape(n, k) + 2 * SUM_ROUNDING * reference(w).double().abs()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_unpacked_groups_are_the_reference_dequantization(ggml_type: T, source: str) -> None:
    w = SOURCES[source](ggml_type, 32, 512)
    groups = unpack_int8(w)
    assert groups.q.dtype == torch.int8 and groups.group == (16 if ggml_type == T.Q6_K else 32)
    low, high = Q_RANGES[ggml_type]
    assert low <= groups.q.min() and groups.q.max() <= high
    assert (groups.zero is not None) == (ggml_type in (T.Q5_1, T.Q5_K))
    assert torch.equal(groups_value(groups), reference(w))


def test_q6_k_sub_blocks_have_their_own_scales() -> None:
    """Each 16 k of a Q6_K super-block takes its own int8 scale, in order."""
    w = random_blocks(T.Q6_K, 16, 256)
    w.data[:, 192:208] = np.arange(-8, 8, dtype=np.int8).view(np.uint8)
    w.data[:, 208:210] = np.array([0.5], dtype=np.float16).view(np.uint8)
    groups = unpack_int8(w)
    assert torch.equal(groups.scale, 0.5 * torch.arange(-8.0, 8.0).expand(16, 16))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_packed_weight_reads_back_the_reference(ggml_type: T, source: str) -> None:
    w = SOURCES[source](ggml_type, 48, 512)
    packed = pack_ggml8(w)
    read = packed.rows(torch.arange(48))
    ref = reference(w)
    if ggml_type in EXACT:
        assert torch.equal(read, ref)
    assert ((read.double() - ref.double()).abs() <= weight_bound(w)).all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kernel_product_is_the_reference_product(ggml_type: T, source: str, rows: int) -> None:
    m, k = 48, 512
    w = SOURCES[source](ggml_type, m, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = pack_ggml8(w).matmul(x).double()
    exact = x.double() @ reference(w).double().T
    bound = ACTIVATION_INT16 * exact.abs().max() + x.double().abs() @ weight_bound(w).T
    assert ((out - exact).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 9])
def test_q6_k_keeps_six_bits_and_multiplies_as_its_int8_form_to_the_bit(rows: int) -> None:
    """Q6_K's integers in 0.75 bytes (+ the fp16 scale per 16 k): the kernel sums the same
    integer products in the same order as from their int8 copy, so the outputs are equal."""
    w = random_blocks(T.Q6_K, 64, 512, seed=rows)
    groups = unpack_int8(w)
    six, eight = pack_native6(groups), pack_native8(*groups)
    assert six.q.dtype == torch.uint8 and six.q.numel() == 64 * 512 * 3 // 4
    assert pack_ggml8(w).q.dtype == torch.uint8  # what loading a Q6_K tensor holds
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(six.matmul(x), eight.matmul(x))
    ids = torch.tensor([[0, 9, 16, 63], [31, 8, 47, 1]])  # columns on both halves of a block
    assert torch.equal(six.rows(ids), eight.rows(ids))


@needs_kernels
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_rows_are_the_weight_the_kernel_multiplies_by(ggml_type: T) -> None:
    w = random_blocks(ggml_type, 48, 256)
    layer = Linear(256, 48)
    layer.load_weight(w, torch.float32)
    assert isinstance(layer.int8, NativeInt8Weight) and layer.weight is None
    assert "int8" in repr(layer)
    ids = torch.tensor([[0, 17, 47], [5, 5, 32]])
    rows = layer.int8.rows(ids)
    assert rows.shape == (2, 3, 256) and rows.dtype == torch.float32
    dense = layer.dequantized()  # read back through the kernel
    torch.testing.assert_close(rows, dense[ids], rtol=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("ggml_type", [T.Q6_K, T.Q5_K, T.Q5_0], ids=lambda t: t.name)
def test_tied_table_stays_packed_for_head_and_embedding(ggml_type: T) -> None:
    vocab, hidden = 64, 256
    w = quantized(ggml_type, vocab, hidden)
    head, embedding = LMHead(hidden, vocab), Embedding(vocab, hidden)
    tie_lm_head(head, embedding, w, torch.float32)
    assert isinstance(head.int8, NativeInt8Weight) and head.weight is None
    assert embedding.table is head.int8 and embedding.weight is None
    ids = torch.tensor([[3, 63, 16]])
    assert torch.equal(embedding(ids), head.int8.rows(ids))
    bound = weight_bound(w)[ids]
    assert ((embedding(ids).double() - reference(w)[ids].double()).abs() <= bound).all()


@needs_kernels
def test_untied_q6_k_head_is_packed_not_fp16() -> None:
    w = quantized(T.Q6_K, 64, 256)
    head = LMHead(256, 64)
    head.load_weight(w, torch.float32)
    assert isinstance(head.int8, NativeInt8Weight) and head.storage_dtype is None


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_rows_not_in_sixteens_fall_back_to_dense(ggml_type: T) -> None:
    w = random_blocks(ggml_type, 24, 256)
    assert not can_pack_native8(w)
    layer = Linear(256, 24)
    layer.load_weight(w, torch.float32)
    assert not isinstance(layer.int8, NativeInt8Weight)
    if ggml_type != T.Q8_0:  # Q8_0 goes to torch's int8 kernel
        assert layer.weight is not None and torch.equal(layer.weight, reference(w))


@pytest.mark.parametrize("ggml_type", [T.Q5_1, T.Q6_K], ids=lambda t: t.name)
def test_without_kernels_5_and_6_bit_types_are_decoded(
    ggml_type: T, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "load", lambda: False)
    w = random_blocks(ggml_type, 32, 256)
    layer, head = Linear(256, 32), LMHead(256, 32)
    layer.load_weight(w, torch.float32)
    head.load_weight(w, torch.float32)
    assert layer.int8 is None and layer.weight is not None
    assert torch.equal(layer.weight, reference(w))
    assert head.int8 is None and head.weight is not None and head.weight.dtype == HEAD_DTYPE
