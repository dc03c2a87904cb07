"""GGMLTensor decodes every supported type exactly as gguf's reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ladle.engine.loading.gguf import read_gguf
from ladle.engine.quant.ggml import SUPPORTED_TYPES, GGMLTensor
from ladle.errors import ModelLoadError, UnsupportedTensorTypeError

T = GGMLQuantizationType
DENSE = {T.F32: np.float32, T.F16: np.float16}

# Byte offsets of each block's f16 scale fields (d, dmin / m), from ggml-common.h.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}  # fmt: skip

# gguf.quants.quantize supports these; the K-quants it can only decode.
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def random_ggml(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random valid blocks: random bytes, but finite and modest f16 scales."""
    rng = np.random.default_rng(seed)
    if ggml_type in (T.F32, T.F16, T.BF16):
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        data = values.astype(DENSE[ggml_type]) if ggml_type in DENSE else quantize(values, T.BF16)
        return GGMLTensor("w", ggml_type, data.view(np.uint8).reshape(rows, -1), (rows, cols))
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[ggml_type]:
        scale = rng.uniform(1e-3, 2e-2, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
        blocks[..., offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return GGMLTensor("w", ggml_type, blocks.reshape(rows, -1), (rows, cols))


def test_every_supported_type_has_a_test_generator() -> None:
    assert set(F16_FIELDS) | {T.F32, T.F16, T.BF16} == SUPPORTED_TYPES


@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(ggml_type: T) -> None:
    w = random_ggml(ggml_type, 16, 512)
    ref = dequantize(w.data, ggml_type).reshape(w.shape)
    out = w.dequantize()
    assert out.dtype == torch.float32 and out.shape == (16, 512)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(out.numpy(), ref)
    assert torch.equal(w.dequantize(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_round_trip_is_within_format_bound(ggml_type: T) -> None:
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 10, (8, 1)).astype(np.float32)
    values = rng.standard_normal((8, 256), dtype=np.float32) * scale
    w = GGMLTensor("w", ggml_type, quantize(values, ggml_type).view(np.uint8), values.shape)
    err = np.abs(w.dequantize().numpy() - values)
    assert (err <= _round_trip_bound(values, ggml_type)).all()


def _round_trip_bound(values: np.ndarray, ggml_type: T) -> np.ndarray:
    """Per-value error bound: half a step (a full one where the top code is clipped), plus
    the f16 rounding of the block constants."""
    if ggml_type in (T.F32, T.F16, T.BF16):
        rel = {T.F32: 0.0, T.F16: 2.0**-11, T.BF16: 2.0**-8}[ggml_type]
        return np.abs(values) * rel
    blocks = values.reshape(values.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    spread = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    step = {
        T.Q4_0: amax / 8,  # symmetric: codes -8..7, the far extreme clips by one step
        T.Q5_0: amax / 16,
        T.Q4_1: spread / 15 / 2,
        T.Q5_1: spread / 31 / 2,
        T.Q8_0: amax / 127 / 2,
    }[ggml_type]
    bound = step + amax * 2.0**-10
    return np.broadcast_to(bound, blocks.shape).reshape(values.shape)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_permute_rows_matches_dense(ggml_type: T) -> None:
    w = random_ggml(ggml_type, 32, 256)
    index = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w.permute_rows(index).dequantize(), w.dequantize()[index])


@pytest.mark.parametrize(
    "ggml_type", [T.Q4_1, T.Q4_K, T.Q5_K, T.Q3_K, T.BF16], ids=lambda t: t.name
)
def test_concat_rows_matches_dense(ggml_type: T) -> None:
    parts = [random_ggml(ggml_type, rows, 256, seed=rows) for rows in (16, 8, 24)]
    fused = GGMLTensor.concat_rows(parts, "qkv")
    assert fused.shape == (48, 256)
    expected = torch.cat([p.dequantize() for p in parts])
    assert torch.equal(fused.dequantize(), expected)


def test_concat_rows_of_mixed_types_names_the_tensors() -> None:
    q, v = random_ggml(T.Q4_K, 16, 256), random_ggml(T.Q6_K, 16, 256)
    v.name = "blk.0.attn_v.weight"
    with pytest.raises(ModelLoadError, match=r"qkv.*attn_v\.weight \(Q6_K"):
        GGMLTensor.concat_rows([q, v], "qkv")


def test_unsupported_type_names_the_tensor() -> None:
    data = np.zeros((4, GGML_QUANT_SIZES[T.IQ2_XXS][1]), dtype=np.uint8)
    with pytest.raises(UnsupportedTensorTypeError, match=r"blk\.3\.attn_q\.weight.*IQ2_XXS"):
        GGMLTensor("blk.3.attn_q.weight", T.IQ2_XXS, data, (4, 256))


def test_wrong_byte_count_names_the_tensor() -> None:
    data = np.zeros((4, 17), dtype=np.uint8)
    with pytest.raises(ModelLoadError, match=r"output\.weight: 68 bytes .* Q4_0"):
        GGMLTensor("output.weight", T.Q4_0, data, (4, 32))


def test_typed_arrays_decode_like_their_bytes() -> None:
    values = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float16)
    typed = GGMLTensor("w", T.F16, values, (16, 64))  # as GGUFReader hands out F16 data
    as_bytes = GGMLTensor("w", T.F16, values.view(np.uint8), (16, 64))
    assert torch.equal(typed.dequantize(), as_bytes.dequantize())
    assert torch.equal(typed.dequantize(torch.float16), torch.from_numpy(values))


def test_one_dimensional_tensors_decode() -> None:
    norm = np.linspace(-1, 1, 64, dtype=np.float32)
    w = GGMLTensor("output_norm.weight", T.F32, norm.view(np.uint8).reshape(64, 4), (64,))
    assert torch.equal(w.dequantize(), torch.from_numpy(norm))
    q = GGMLTensor("bias", T.Q8_0, quantize(norm, T.Q8_0), (64,))
    np.testing.assert_array_equal(q.dequantize().numpy(), dequantize(q.data, T.Q8_0))


@pytest.mark.real_model
def test_smollm2_q8_0_embedding_decodes_like_gguf(smollm2_path) -> None:
    embd = read_gguf(smollm2_path).tensors["token_embd.weight"]
    assert embd.ggml_type == T.Q8_0 and embd.shape == (49152, 576)
    out = embd.dequantize()
    np.testing.assert_array_equal(out.numpy(), dequantize(embd.data, T.Q8_0))
    out[0, 0] = 0.0  # decoded tensors own their memory, never the read-only file map
