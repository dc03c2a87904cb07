"""Phi-3 against transformers: fused checkpoints, partial rotary, sliding window, LongRoPE."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _longrope(rotary_dim: int) -> dict:
    generator = torch.Generator().manual_seed(4)
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": (1 + torch.rand(rotary_dim // 2, generator=generator)).tolist(),
        "long_factor": (1 + 10 * torch.rand(rotary_dim // 2, generator=generator)).tolist(),
    }


def test_phi3_prefill_and_decode_match_transformers(reference, tmp_path: Path) -> None:
    hf = reference.build_hf_model(Phi3Config(**TINY), Phi3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    reference.assert_matches_transformers(hf, model, atol=1e-4)


def test_phi3_partial_rotary_with_sliding_window(reference, tmp_path: Path) -> None:
    config = Phi3Config(**TINY, partial_rotary_factor=0.5, sliding_window=6)
    hf = reference.build_hf_model(config, Phi3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    assert model.model.rotary_emb.dim == 8
    reference.assert_matches_transformers(hf, model, prompt_len=10, steps=5, atol=1e-4)


def test_phi3_longrope_prompt_longer_than_original_context(reference, tmp_path: Path) -> None:
    config = Phi3Config(**TINY, original_max_position_embeddings=8, rope_parameters=_longrope(16))
    hf = reference.build_hf_model(config, Phi3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    rotary = model.model.rotary_emb
    assert rotary.long_after == 8 and rotary.attention_scaling > 1.0
    reference.assert_matches_transformers(hf, model, prompt_len=12, atol=1e-4)


def test_phi3_longrope_switches_when_decoding_crosses_it(reference, tmp_path: Path) -> None:
    """Like transformers, a step whose sequence passes the original context uses the long
    factors for its new tokens; keys cached before keep the short ones."""
    config = Phi3Config(**TINY, original_max_position_embeddings=8, rope_parameters=_longrope(16))
    hf = reference.build_hf_model(config, Phi3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    reference.assert_matches_transformers(hf, model, prompt_len=6, steps=5, atol=1e-4)


def test_phi3_gguf_matches_transformers_on_the_same_file(reference, tmp_path: Path) -> None:
    hf = reference.build_hf_model(Phi3Config(**TINY), Phi3ForCausalLM)
    metadata = {**reference.llama_gguf_metadata(hf.config), "rope.dimension_count": 16}
    path = reference.write_gguf(tmp_path / "phi3.gguf", hf, "phi3", metadata)
    hf_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    hf_gguf.config._attn_implementation = "eager"
    model = reference.load_ladle_gguf(path)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (192, 64)
    reference.assert_matches_transformers(hf_gguf, model, atol=1e-4)
