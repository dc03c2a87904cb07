"""RoPE frequencies equal transformers' `ROPE_INIT_FUNCTIONS`; rotation equals its apply."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from ladle.engine.layers.rotary import RotaryEmbedding, apply_rotary, rope_frequencies, rotary_dim
from ladle.engine.loading.config import ModelConfig

HEAD_DIM = 64
LINEAR = {"rope_type": "linear", "factor": 2.0}
CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 256,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 24,
        "truncate": False,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "attention_factor": 1.3,
        "original_max_position_embeddings": 1024,
    },
}


def _hf_config(scaling: dict, partial: float = 1.0, **kwargs) -> LlamaConfig:
    rope = {**scaling, "rope_theta": 50000.0}
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        rope_parameters=rope,
        **kwargs,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_frequencies_equal_transformers(case: str) -> None:
    scaling = CASES[case]
    expected, expected_scaling = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](_hf_config(scaling))
    config = ModelConfig(
        "llama",
        10,
        256,
        10,
        1,
        4,
        head_dim=HEAD_DIM,
        rope_theta=50000.0,
        rope_scaling=scaling,
        max_position_embeddings=2048,
    )
    inv_freq, attention_scaling = rope_frequencies(
        HEAD_DIM, config.rope_theta, config.rope_scaling, config.max_position_embeddings
    )
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert attention_scaling == pytest.approx(expected_scaling, rel=1e-12)


def test_default_and_dynamic_equal_plain_rope() -> None:
    expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(_hf_config({}))
    plain, _ = rope_frequencies(HEAD_DIM, 50000.0)
    dynamic, _ = rope_frequencies(HEAD_DIM, 50000.0, {"rope_type": "dynamic", "factor": 2.0})
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
    torch.testing.assert_close(dynamic, expected, rtol=0, atol=0)


@pytest.mark.parametrize("factor", [None, 16.0])
@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_short_and_long_equal_transformers(factor: float | None, partial: float) -> None:
    dim = rotary_dim(HEAD_DIM, partial)
    generator = torch.Generator().manual_seed(0)
    scaling = {
        "rope_type": "longrope",
        "short_factor": (1 + torch.rand(dim // 2, generator=generator)).tolist(),
        "long_factor": (1 + 20 * torch.rand(dim // 2, generator=generator)).tolist(),
        "original_max_position_embeddings": 128,
    }
    if factor is not None:
        scaling["factor"] = factor
    hf_config = Phi3Config(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=2048,
        original_max_position_embeddings=128,
        rope_parameters={**scaling, "rope_theta": 10000.0},
        partial_rotary_factor=partial,
    )
    for long, seq_len in ((False, None), (True, 129)):
        expected, expected_scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, seq_len=seq_len)
        inv_freq, attention_scaling = rope_frequencies(dim, 10000.0, scaling, 2048, long=long)
        torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
        assert attention_scaling == pytest.approx(expected_scaling, rel=1e-12)
    expected_factor = factor or 2048 / 128
    assert attention_scaling == pytest.approx(
        math.sqrt(1 + math.log(expected_factor) / math.log(128))
    )


def test_gguf_rope_freqs_reproduce_llama3() -> None:
    """llama.cpp stores Llama 3.1's scaling as per-frequency divisors (`rope_freqs`)."""
    scaling = CASES["llama3"]
    llama3, _ = rope_frequencies(HEAD_DIM, 50000.0, scaling)
    plain, _ = rope_frequencies(HEAD_DIM, 50000.0)
    factors = []  # llama.cpp's convert_hf_to_gguf.py formula
    for freq in plain.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < 512 / 4.0:
            factors.append(1.0)
        elif wavelen > 512 / 1.0:
            factors.append(8.0)
        else:
            smooth = (512 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    from_gguf, _ = rope_frequencies(
        HEAD_DIM, 50000.0, {"rope_type": "freq_factors", "factors": factors}
    )
    torch.testing.assert_close(from_gguf, llama3, rtol=1e-6, atol=0)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_transformers(partial: float, dtype: torch.dtype) -> None:
    hf_config = _hf_config(LINEAR, partial)
    hf_rotary = LlamaRotaryEmbedding(hf_config)
    if partial != 1.0:  # Llama's rotary ignores partial_rotary_factor; Phi-3's honours it
        dim = rotary_dim(HEAD_DIM, partial)
        hf_rotary.inv_freq = rope_frequencies(dim, 50000.0, LINEAR)[0]
    rotary = RotaryEmbedding(HEAD_DIM, 50000.0, LINEAR, partial)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, HEAD_DIM, generator=generator).to(dtype)  # [T, heads, head_dim]
    k = torch.randn(7, 2, HEAD_DIM, generator=generator).to(dtype)
    positions = torch.tensor([0, 1, 2, 3, 100, 1000, 5000])  # past the first table: it grows
    cos, sin = hf_rotary(q, positions[None])
    expected_q, expected_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    cos, sin = rotary(positions, 5001, dtype)
    torch.testing.assert_close(apply_rotary(q, cos, sin), expected_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), expected_k[0].transpose(0, 1))


def test_longrope_table_follows_sequence_length() -> None:
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 16,
    }
    rotary = RotaryEmbedding(16, 10000.0, scaling, max_position_embeddings=64)
    positions = torch.arange(4)
    short_cos, _ = rotary(positions, 16, torch.float32)
    long_cos, _ = rotary(positions, 17, torch.float32)
    assert not torch.equal(short_cos, long_cos)
    plain = RotaryEmbedding(16, 10000.0)
    torch.testing.assert_close(
        short_cos / rotary.attention_scaling, plain(positions, 16, torch.float32)[0]
    )
