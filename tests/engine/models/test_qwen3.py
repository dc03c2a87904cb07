"""Qwen 3 against transformers: per-head q/k RMSNorm before RoPE, explicit head_dim."""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen3Config, Qwen3ForCausalLM

TINY = dict(
    vocab_size=192,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # not hidden_size / heads, as in the real Qwen 3 models
    max_position_embeddings=256,
)


def test_qwen3_prefill_and_decode_match_transformers(reference, tmp_path: Path) -> None:
    hf = reference.build_hf_model(Qwen3Config(**TINY), Qwen3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    assert model.model.layers[0].self_attn.q_norm is not None
    reference.assert_matches_transformers(hf, model, atol=1e-4)


def test_qwen3_tied_embeddings_with_attention_bias(reference, tmp_path: Path) -> None:
    config = Qwen3Config(**TINY, tie_word_embeddings=True, attention_bias=True)
    hf = reference.build_hf_model(config, Qwen3ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path, max_shard_size="30KB"))
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    reference.assert_matches_transformers(hf, model, atol=1e-4)
