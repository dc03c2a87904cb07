"""Gemma, Gemma 2 and Gemma 3 (text) against transformers, on tiny random weights.

Gemma 2 and 3 get sliding and global layers, a window shorter than the prompt and soft-caps
small enough to bend the logits; every model gets norm weights far from zero (transformers
initializes them to 0, which would hide a missing `1 + w`). Logits must match transformers'
eager attention (the path that soft-caps) to 1e-4 in float32, in prefill and in decode
through the KV cache, whether the weights come from safetensors or from a GGUF file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, RopeScalingType
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.weights import gguf_weights, safetensors_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.models.base import CausalLM
from ladle.engine.step_compiler import StepCompiler

TOLERANCE = 1e-4  # max abs logit difference, float32
BF16_TOLERANCE = 0.25
PROMPT_LEN, DECODE_STEPS, WINDOW = 12, 4, 5
SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
# Global every 3rd layer, not transformers' default 6th: the config's `layer_types` must rule.
GEMMA3_LAYER_TYPES = (["sliding_attention"] * 2 + ["full_attention"]) * 2
CASES = {
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(num_hidden_layers=2)),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(
            num_hidden_layers=4,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            num_hidden_layers=6,
            layer_types=GEMMA3_LAYER_TYPES,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            rope_theta=50_000.0,
            rope_local_base_freq=500.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
}

# Per model, the setting that turns each feature off (or makes it a no-op).
FEATURES_OFF: dict[str, dict[str, object]] = {
    "gemma2": {
        "sliding_window": 4 * PROMPT_LEN,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "query_pre_attn_scalar": SHAPE["head_dim"],
    },
    "gemma3_text": {
        "sliding_window": 4 * PROMPT_LEN,
        "final_logit_softcapping": None,
        "query_pre_attn_scalar": SHAPE["head_dim"],
        "rope_local_base_freq": 50_000.0,  # the global base
        "rope_scaling": None,
    },
}


def _randomize(model: PreTrainedModel) -> None:
    """Weights big enough that attention is not uniform and every norm scale matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.5 if name.endswith("norm.weight") else 0.15
            param.normal_(0.0, std)


def _hf_model(arch: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    config_cls, model_cls, extra = CASES[arch]
    config: PretrainedConfig = config_cls(**SHAPE, **{**extra, **overrides})
    config._attn_implementation = "eager"  # the path that applies attention soft-capping
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model)
    return model


def _token_ids(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (PROMPT_LEN + DECODE_STEPS,), generator=generator)


def _load_safetensors(
    hf: PreTrainedModel, folder: Path, dtype: torch.dtype = torch.float32
) -> CausalLM:
    hf.save_pretrained(folder, safe_serialization=True)
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), folder)
    model = ARCHITECTURES[config.architecture](config)
    model.load_weights(safetensors_weights(folder), dtype)
    return model


def _run(
    model: CausalLM, token_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits of every position: the prompt in one prefill, then one token per step."""
    cache = model.new_cache(dtype)
    positions = torch.arange(token_ids.shape[0])
    with torch.inference_mode():
        rows = [model(token_ids[:PROMPT_LEN], positions[:PROMPT_LEN], cache)]
        for i in range(PROMPT_LEN, token_ids.shape[0]):
            rows.append(model(token_ids[i : i + 1], positions[i : i + 1], cache))
    assert cache.length == token_ids.shape[0]
    return torch.cat(rows)


def _reference(hf: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(token_ids.unsqueeze(0), use_cache=False).logits[0].float()


@pytest.mark.parametrize("arch", list(CASES))
def test_prefill_and_decode_match_transformers(arch: str, tmp_path: Path) -> None:
    hf = _hf_model(arch)
    model = _load_safetensors(hf, tmp_path)
    token_ids = _token_ids(seed=1)
    expected = _reference(hf, token_ids)
    got = _run(model, token_ids)
    assert got.shape == expected.shape == (PROMPT_LEN + DECODE_STEPS, SHAPE["vocab_size"])
    assert (got - expected).abs().max().item() < TOLERANCE
    assert expected.std() > 0.3  # the random model is not degenerate: logits differ by token


@pytest.mark.parametrize("arch", list(CASES))
def test_bfloat16_matches_transformers_within_rounding(arch: str, tmp_path: Path) -> None:
    hf = _hf_model(arch)
    model = _load_safetensors(hf, tmp_path, torch.bfloat16)
    token_ids = _token_ids(seed=1)
    expected = _reference(hf.to(torch.bfloat16), token_ids)
    got = _run(model, token_ids, torch.bfloat16)
    assert got.dtype == torch.float32
    # bf16 rounding alone moves these logits (|x| < 6) by ~0.1 from their float32 values.
    assert (got - expected).abs().max().item() < BF16_TOLERANCE


@pytest.mark.parametrize("arch", list(CASES))
def test_float16_kv_cache_matches_float32_within_its_rounding(arch: str, tmp_path: Path) -> None:
    """A float32 model over a float16 KV cache (the engine's default), through the windowed
    and soft-capped prefill and decode paths, which read the rounded keys and values back in
    float32. Rounding them (relative 2^-11) moves these logits (|x| < 6) by ~0.004: more than
    float32's own error, so the cache did round, and well under 2e-2."""
    model = _load_safetensors(_hf_model(arch), tmp_path)
    token_ids = _token_ids(seed=1)
    half = _run(model, token_ids, torch.float16)
    assert half.dtype == torch.float32
    diff = (half - _run(model, token_ids)).abs().max().item()
    assert 10 * TOLERANCE < diff < 2e-2


@pytest.mark.parametrize(
    ("arch", "feature"), [(arch, key) for arch, off in FEATURES_OFF.items() for key in off]
)
def test_each_feature_moves_the_reference(arch: str, feature: str) -> None:
    """A model that ignored any one feature would fail the comparison above."""
    token_ids = _token_ids(seed=1)
    base = _reference(_hf_model(arch), token_ids)
    other = _reference(_hf_model(arch, **{feature: FEATURES_OFF[arch][feature]}), token_ids)
    assert (other - base).abs().max().item() > 100 * TOLERANCE


def test_logits_indices_select_rows(tmp_path: Path) -> None:
    hf = _hf_model("gemma2")
    model = _load_safetensors(hf, tmp_path)
    token_ids = _token_ids(seed=2)[:PROMPT_LEN]
    positions, last_row = torch.arange(PROMPT_LEN), torch.tensor([PROMPT_LEN - 1])
    with torch.inference_mode():
        full = model(token_ids, positions, model.new_cache(torch.float32))
        last = model(token_ids, positions, model.new_cache(torch.float32), last_row)
    assert last.shape == (1, SHAPE["vocab_size"]) and last.dtype == torch.float32
    torch.testing.assert_close(last[0], full[-1])


@pytest.mark.parametrize("arch", list(CASES)[1:])  # soft-caps, windows, local rope, q/k norms
def test_compiled_step_matches_eager(arch: str, tmp_path: Path) -> None:
    """The compiled step (`step_compiler.py`) on Gemma's extra paths: prefill, then decode."""
    model = _load_safetensors(_hf_model(arch), tmp_path)
    token_ids = _token_ids(seed=3)

    def run() -> torch.Tensor:
        cache, rows = model.new_cache(torch.float32), []
        with torch.inference_mode():
            positions, first = torch.arange(token_ids.shape[0]), torch.tensor([0])
            last = torch.tensor([PROMPT_LEN - 1])
            rows.append(model(token_ids[:PROMPT_LEN], positions[:PROMPT_LEN], cache, last))
            for i in range(PROMPT_LEN, token_ids.shape[0]):
                rows.append(model(token_ids[i : i + 1], positions[i : i + 1], cache, first))
        return torch.cat(rows)

    eager = run()
    compiler = StepCompiler(model, torch.float32)
    compiler.start()
    assert compiler.wait(600), compiler.status
    with torch.profiler.profile() as prof:
        compiled = run()
    assert any("Torch-Compiled Region" in e.name for e in prof.events())
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def _write_gguf(hf: PreTrainedModel, path: Path, arch: str) -> None:
    """A llama.cpp-style GGUF: its tensor names, its metadata, norms stored as `1 + w`."""
    c = hf.config
    writer = GGUFWriter(path, arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "gemma":
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    elif arch == "gemma2":
        writer.add_sliding_window(c.sliding_window)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    else:
        writer.add_sliding_window(c.sliding_window)
        writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_parameters["full_attention"]["factor"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    block_names = _GGUF_NAMES_GEMMA if arch == "gemma" else _GGUF_NAMES
    for name, tensor in _gguf_tensors(hf.state_dict(), c.num_hidden_layers, block_names):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma's second norm comes before the MLP: llama.cpp's `ffn_norm`, as for Llama.
_GGUF_NAMES_GEMMA = {**_GGUF_NAMES, "post_attention_layernorm": "ffn_norm"}


def _gguf_tensors(
    state: dict[str, torch.Tensor], num_layers: int, block_names: dict[str, str]
) -> list[tuple[str, np.ndarray]]:
    """HF tensors under llama.cpp's names (convert_hf_to_gguf adds 1 to Gemma's norms)."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for i in range(num_layers):
        for hf_name, gguf_name in block_names.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{gguf_name}.weight"
    out = []
    for hf_name, gguf_name in names.items():
        if hf_name not in state:
            continue  # q/k norms exist in Gemma 3 only, sandwich norms from Gemma 2 on
        tensor = state[hf_name].float()
        if hf_name.endswith("norm.weight"):
            tensor = tensor + 1.0
        out.append((gguf_name, tensor.numpy()))
    return out


@pytest.mark.parametrize(
    ("arch", "gguf_arch"), [("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3_text", "gemma3")]
)
def test_gguf_round_trip_matches_safetensors(arch: str, gguf_arch: str, tmp_path: Path) -> None:
    # llama.cpp's rules, which GGUF files cannot override: queries scaled by 1/sqrt(head_dim),
    # Gemma 3 global every 6th layer with a local RoPE base of 10000, no final soft-cap.
    overrides: dict[str, object] = {}
    if arch != "gemma":
        overrides["query_pre_attn_scalar"] = SHAPE["head_dim"]
    if arch == "gemma3_text":
        overrides |= {
            "layer_types": None,
            "rope_local_base_freq": 10_000.0,
            "final_logit_softcapping": None,
        }
    hf = _hf_model(arch, seed=3, **overrides)
    from_safetensors = _load_safetensors(hf, tmp_path / "hf")
    path = tmp_path / "tiny.gguf"
    _write_gguf(hf, path, gguf_arch)
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    assert config.architecture == arch
    assert config.layer_types == from_safetensors.config.layer_types
    from_gguf = ARCHITECTURES[arch](config)
    from_gguf.load_weights(gguf_weights(gguf, config), torch.float32)
    token_ids = _token_ids(seed=4)
    expected = _run(from_safetensors, token_ids)
    assert (_run(from_gguf, token_ids) - expected).abs().max().item() < TOLERANCE
    assert (expected - _reference(hf, token_ids)).abs().max().item() < TOLERANCE
