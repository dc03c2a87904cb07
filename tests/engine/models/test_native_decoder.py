"""Every architecture on the native decoder (one kernel call a step) against transformers.

Each family's tiny random model runs with the native kernels on: the whole decoder must be
one `native.Decoder` (no family waits for `torch.compile`), its logits must match transformers
within 1e-4 (float32, prefill then decode through the KV cache), and equal bit for bit what
the same model computes layer by layer on the same kernels. A prompt of 300 tokens with a
window of 150 puts the window's edge inside the attention kernels' 128-position spans, and
the decode steps move it across one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ladle.engine.kernels import native

pytestmark = pytest.mark.skipif(not native.load(), reason="native kernels unavailable")

TOLERANCE = 1e-4  # max abs logit difference, float32
SHAPE = dict(
    vocab_size=192,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    num_hidden_layers=3,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LONG_PROMPT, WINDOW = 300, 150
CASES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, object]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True}),
    "mistral_window": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
    "phi3_partial_rotary": (Phi3Config, Phi3ForCausalLM, {"partial_rotary_factor": 0.5}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {
            "num_hidden_layers": 4,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,
            "rope_theta": 50_000.0,
            "rope_local_base_freq": 500.0,
        },
    ),
}


def _hf_model(name: str) -> PreTrainedModel:
    config_cls, model_cls, extra = CASES[name]
    config = config_cls(**{**SHAPE, **extra})
    config._attn_implementation = "eager"  # the path that soft-caps and windows exactly
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # weights big enough that attention is not uniform
        for param_name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if param_name.endswith("norm.weight") else 0.15)
    return model


@pytest.mark.parametrize("name", CASES)
def test_every_family_runs_whole_on_the_native_decoder(
    reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    hf = _hf_model(name)
    model = reference.load_ladle(reference.save_hf_model(hf, tmp_path))
    model.use_native_kernels()
    assert model.runs_on_kernels(), f"{name} does not run whole on the native decoder"
    prompt_len = LONG_PROMPT if "window" in str(CASES[name][2]) else 40
    reference.assert_matches_transformers(hf, model, prompt_len=prompt_len, atol=TOLERANCE)

    prompt, tokens = torch.arange(prompt_len) % SHAPE["vocab_size"], [5, 7, 11]
    stacked = reference.ladle_logits(model, prompt, tokens, torch.float32)
    with monkeypatch.context() as patch:
        patch.setattr(model.model.stack, "decoder", lambda layers, eps: None)
        layer_by_layer = reference.ladle_logits(model, prompt, tokens, torch.float32)
    for a, b in zip(stacked, layer_by_layer, strict=True):
        assert torch.equal(a, b)
