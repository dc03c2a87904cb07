"""Qwen 2 against transformers: q/k/v biases, sliding-window layers, and its GGUF layout."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(
    vocab_size=192,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=1000000.0,
)


def test_qwen2_prefill_and_decode_match_transformers(reference, tmp_path: Path) -> None:
    hf = reference.build_hf_model(Qwen2Config(**TINY), Qwen2ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None
    reference.assert_matches_transformers(hf, model, atol=1e-4)


def test_qwen2_sliding_window_from_max_window_layers(reference, tmp_path: Path) -> None:
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    hf = reference.build_hf_model(config, Qwen2ForCausalLM)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    reference.assert_matches_transformers(hf, model, prompt_len=10, steps=5, atol=1e-4)


def test_qwen2_gguf_matches_transformers_on_the_same_file(reference, tmp_path: Path) -> None:
    hf = reference.build_hf_model(Qwen2Config(**TINY), Qwen2ForCausalLM)
    metadata = reference.llama_gguf_metadata(hf.config)
    path = reference.write_gguf(tmp_path / "qwen2.gguf", hf, "qwen2", metadata)
    hf_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    hf_gguf.config._attn_implementation = "eager"
    reference.assert_matches_transformers(hf_gguf, reference.load_ladle_gguf(path), atol=1e-4)
