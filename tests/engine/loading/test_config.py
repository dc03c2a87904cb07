"""ModelConfig from config.json (both transformers layouts) and from GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from transformers import (
    AutoConfig,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
)

from ladle.engine.loading.config import SUPPORTED_ARCHITECTURES, ModelConfig
from ladle.engine.loading.gguf import GGUFFile, read_gguf
from ladle.engine.models import ARCHITECTURES
from ladle.engine.quant.ggml import GGMLTensor
from ladle.errors import ModelLoadError, UnsupportedArchitectureError

SHAPE = dict(
    vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4
)


def _saved(config) -> dict:
    """config.json as transformers 5 writes it."""
    return json.loads(config.to_json_string())


def test_every_registered_architecture_has_a_config_reader() -> None:
    assert set(ARCHITECTURES) <= set(SUPPORTED_ARCHITECTURES)


def test_llama_config_json() -> None:
    config = ModelConfig.from_hf(
        _saved(LlamaConfig(**SHAPE, num_key_value_heads=2, rope_theta=500000.0)), "m"
    )
    assert (config.architecture, config.head_dim, config.num_key_value_heads) == ("llama", 16, 2)
    assert config.rope_theta == 500000.0 and config.rope_scaling is None
    assert config.layer_types == ["full_attention"] * 6
    assert config.hidden_act == "silu" and not config.tie_word_embeddings


def test_transformers_4_layout_with_rope_scaling_type() -> None:
    old = {
        "model_type": "llama",
        **SHAPE,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
    }
    config = ModelConfig.from_hf(old)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling["rope_type"] == "llama3" and "type" not in config.rope_scaling
    assert config.original_max_position_embeddings == 8192
    assert config.torch_dtype == "bfloat16"


def test_qwen2_disabled_sliding_window_is_ignored() -> None:
    raw = {
        "model_type": "qwen2",
        **SHAPE,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 21,
    }
    config = ModelConfig.from_hf(raw)
    assert config.sliding_window is None
    assert config.layer_types == ["full_attention"] * 6


def test_qwen2_sliding_window_layers() -> None:
    hf = Qwen2Config(
        **SHAPE,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=4,
    )
    raw = _saved(hf)
    del raw["layer_types"]  # as configs written before transformers stored layer_types
    assert ModelConfig.from_hf(raw).layer_types == hf.layer_types
    assert ModelConfig.from_hf(_saved(hf)).layer_types == hf.layer_types


def test_gemma2_defaults_and_layer_types() -> None:
    hf = Gemma2Config(**SHAPE, head_dim=16, sliding_window=16)
    config = ModelConfig.from_hf(_saved(hf))
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings
    assert config.attn_logit_softcapping == 50.0 and config.final_logit_softcapping == 30.0
    assert config.query_pre_attn_scalar == 256
    assert config.layer_types == hf.layer_types
    raw = {"model_type": "gemma2", **SHAPE, "sliding_window": 16, "hidden_act": "gelu"}
    old = ModelConfig.from_hf(raw)
    assert old.layer_types == hf.layer_types and old.hidden_act == "gelu_pytorch_tanh"


def test_gemma3_per_layer_type_rope() -> None:
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    hf = Gemma3TextConfig(**SHAPE, head_dim=16, sliding_window=16, rope_parameters=rope)
    config = ModelConfig.from_hf(_saved(hf))
    assert config.architecture == "gemma3_text"
    assert config.rope_theta == 1000000.0 and config.rope_local_base_freq == 10000.0
    assert config.rope_scaling == {
        "rope_type": "linear",
        "factor": 8.0,
        "original_max_position_embeddings": 131072,
    }
    assert config.layer_types == hf.layer_types


def test_gemma3_multimodal_config_reads_its_text_config() -> None:
    raw = {
        "model_type": "gemma3",
        "text_config": {
            **SHAPE,
            "model_type": "gemma3_text",
            "sliding_window": 16,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
        },
    }
    config = ModelConfig.from_hf(raw)
    assert config.architecture == "gemma3" and config.rope_local_base_freq == 1e4
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_phi3_su_scaling_is_longrope_with_top_level_original_context() -> None:
    raw = {
        "model_type": "phi3",
        **SHAPE,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
    }
    config = ModelConfig.from_hf(raw)
    assert config.rope_scaling["rope_type"] == "longrope"
    assert config.rope_scaling["original_max_position_embeddings"] == 4096
    assert config.partial_rotary_factor == 0.75
    saved = ModelConfig.from_hf(_saved(Phi3Config(**SHAPE, partial_rotary_factor=0.5)))
    assert saved.partial_rotary_factor == 0.5 and saved.rope_scaling is None


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'falcon' is not supported") as e:
        ModelConfig.from_hf({"model_type": "falcon", **SHAPE}, "/models/f/config.json")
    assert e.value.path == "/models/f/config.json" and "llama" in str(e.value)


@pytest.mark.parametrize("missing", ["model_type", "hidden_size", "num_attention_heads"])
def test_missing_field_is_named(missing: str) -> None:
    raw = {"model_type": "llama", **SHAPE}
    del raw[missing]
    with pytest.raises(ModelLoadError, match=missing) as e:
        ModelConfig.from_hf(raw, "cfg.json")
    assert e.value.path == "cfg.json"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "mrope"}}, "rope_scaling"),
        (
            {
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [1.0] * 7,
                }
            },
            "long_factor has 7 entries, not 8",
        ),
        ({"layer_types": ["full_attention"] * 5}, "layer_types"),
        ({"layer_types": ["sliding_attention"] * 6}, "sliding_window"),
    ],
)
def test_bad_values_are_named(change: dict, field: str) -> None:
    with pytest.raises(ModelLoadError, match=field):
        ModelConfig.from_hf({"model_type": "llama", **SHAPE, **change})


@pytest.mark.real_model
def test_smollm2_gguf_matches_transformers_reading(smollm2_path: Path) -> None:
    config = ModelConfig.from_gguf(read_gguf(smollm2_path))
    hf = AutoConfig.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(config, name) == getattr(hf, name), name
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert config.architecture == "llama" and config.path == str(smollm2_path)


def _gguf(arch: str, metadata: dict, tensors: dict | None = None) -> GGUFFile:
    base = {
        "block_count": 12,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "attention.head_count": 4,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    meta = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in base.items()}}
    meta.update(metadata)
    tensors = tensors or {}
    return GGUFFile(Path(f"{arch}.gguf"), meta, {"output.weight": None, **tensors})


def _f32(name: str, values: list[float]) -> GGMLTensor:
    data = np.asarray(values, dtype=np.float32).view(np.uint8).reshape(len(values), 4)
    return GGMLTensor(name, GGMLQuantizationType.F32, data, (len(values),))


def test_gguf_vocab_size_falls_back_to_the_token_list() -> None:
    config = ModelConfig.from_gguf(_gguf("qwen2", {"tokenizer.ggml.tokens": ["a"] * 77}))
    assert config.vocab_size == 77 and config.architecture == "qwen2"
    assert not config.tie_word_embeddings  # output.weight is present
    with pytest.raises(ModelLoadError, match="vocab_size"):
        ModelConfig.from_gguf(_gguf("qwen2", {}))


def test_gguf_missing_key_is_named() -> None:
    gguf = _gguf("llama", {"llama.vocab_size": 10})
    del gguf.metadata["llama.feed_forward_length"]
    with pytest.raises(ModelLoadError, match=r"llama\.feed_forward_length") as e:
        ModelConfig.from_gguf(gguf)
    assert e.value.path == "llama.gguf"


def test_gguf_unknown_architecture() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'falcon' is not supported"):
        ModelConfig.from_gguf(_gguf("falcon", {}))


def test_gguf_gemma2_softcaps_window_and_layer_types() -> None:
    gguf = _gguf(
        "gemma2",
        {
            "gemma2.vocab_size": 10,
            "gemma2.attention.key_length": 32,
            "gemma2.attention.sliding_window": 4096,
            "gemma2.attn_logit_softcapping": 50.0,
            "gemma2.final_logit_softcapping": 30.0,
        },
    )
    config = ModelConfig.from_gguf(gguf)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.sliding_window == 4096 and config.head_dim == 32
    assert config.layer_types == Gemma2Config(num_hidden_layers=12).layer_types
    assert config.query_pre_attn_scalar == 32.0 and config.hidden_act == "gelu_pytorch_tanh"


def test_gguf_gemma3_local_base_pattern_and_linear_scaling() -> None:
    gguf = _gguf(
        "gemma3",
        {
            "gemma3.vocab_size": 10,
            "gemma3.attention.sliding_window": 512,
            "gemma3.rope.freq_base": 1e6,
            "gemma3.rope.scaling.type": "linear",
            "gemma3.rope.scaling.factor": 8.0,
        },
    )
    config = ModelConfig.from_gguf(gguf)
    assert config.architecture == "gemma3_text"
    assert (config.rope_theta, config.rope_local_base_freq) == (1e6, 10000.0)
    assert config.rope_scaling["rope_type"] == "linear" and config.rope_scaling["factor"] == 8.0
    expected = Gemma3TextConfig(num_hidden_layers=12, sliding_window=512).layer_types
    assert config.layer_types == expected


def test_gguf_phi3_longrope_from_factor_tensors() -> None:
    long, short = [1.5] * 6, [1.0] * 6  # rotary dim 12
    gguf = _gguf(
        "phi3",
        {
            "phi3.vocab_size": 10,
            "phi3.rope.dimension_count": 12,
            "phi3.context_length": 131072,
            "phi3.rope.scaling.original_context_length": 4096,
            "phi3.rope.scaling.attn_factor": 1.19,
            "phi3.attention.sliding_window": 0,
        },
        {
            "rope_factors_long.weight": _f32("long", long),
            "rope_factors_short.weight": _f32("short", short),
        },
    )
    config = ModelConfig.from_gguf(gguf)
    assert config.rope_scaling == {
        "rope_type": "longrope",
        "long_factor": long,
        "short_factor": short,
        "attention_factor": pytest.approx(1.19),
        "original_max_position_embeddings": 4096,
    }
    assert config.partial_rotary_factor == 0.75 and config.sliding_window is None


def test_gguf_llama_rope_freqs_tensor() -> None:
    factors = [1.0, 1.0, 2.5, 8.0]
    gguf = _gguf(
        "llama",
        {"llama.vocab_size": 10, "llama.attention.head_count": 8},
        {"rope_freqs.weight": _f32("rope_freqs", factors)},
    )
    config = ModelConfig.from_gguf(gguf)
    assert config.rope_scaling["rope_type"] == "freq_factors"
    assert torch.tensor(config.rope_scaling["factors"]).tolist() == factors
