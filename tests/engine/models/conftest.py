"""Helpers that check a ladle architecture against transformers on tiny random models.

A test builds a transformers model from a tiny config, saves it as safetensors, loads the
folder with ladle, and compares logits for a prompt and for greedy decode steps that go
through the KV cache (transformers with `past_key_values`, ladle with its `KVCache`).
Test modules get the helpers as fixtures (conftest modules are not importable by name).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.constants import MODEL_ARCH_NAMES
from gguf.quants import quantize
from transformers import PretrainedConfig, PreTrainedModel

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.weights import gguf_weights, safetensors_weights
from ladle.engine.models import ARCHITECTURES, CausalLM


def build_hf_model(config: PretrainedConfig, model_cls: type[PreTrainedModel]) -> PreTrainedModel:
    """A transformers model with weights large enough that every path moves the logits."""
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:  # norms near their neutral value, never exactly it
                neutral = 0.0 if "gemma" in config.model_type else 1.0
                param.copy_(neutral + 0.2 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
    return model


def save_hf_model(model: PreTrainedModel, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def load_ladle(folder: Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), folder)
    model = ARCHITECTURES[config.architecture](config)
    model.load_weights(safetensors_weights(folder), dtype)
    return model.eval()


def load_ladle_gguf(path: Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    model = ARCHITECTURES[config.architecture](config)
    model.load_weights(gguf_weights(gguf, config), dtype)
    return model.eval()


@torch.inference_mode()
def hf_logits(
    model: PreTrainedModel, prompt_ids: torch.Tensor, steps: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill logits `[T, V]`, then `steps` greedy decode logits `[1, V]`, and those tokens."""
    out = model(prompt_ids[None], use_cache=True)
    logits, tokens = [out.logits[0].float()], []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        out = model(
            torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
        )
        logits.append(out.logits[0].float())
    return logits, tokens


@torch.inference_mode()
def ladle_logits(
    model: CausalLM, prompt_ids: torch.Tensor, tokens: list[int], dtype: torch.dtype
) -> list[torch.Tensor]:
    """The same sequence through ladle: one prefill, then one token per step."""
    cache = model.new_cache(dtype, capacity=8)  # small, so decoding also grows it
    logits = [model(prompt_ids, torch.arange(len(prompt_ids)), cache)]
    for token in tokens:
        position = torch.tensor([cache.length])
        logits.append(model(torch.tensor([token]), position, cache))
    return logits


def assert_matches_transformers(
    hf_model: PreTrainedModel,
    model: CausalLM,
    prompt_len: int = 10,
    steps: int = 4,
    atol: float = 1e-4,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Prefill and decode logits agree to `atol` (max abs); the logits are O(1)-O(10)."""
    vocab_size = model.config.vocab_size
    prompt_ids = torch.randint(
        0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)
    )
    expected, tokens = hf_logits(hf_model, prompt_ids, steps)
    actual = ladle_logits(model, prompt_ids, tokens, dtype)
    assert expected[0].std() > 0.5, "logits too flat for the comparison to mean much"
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.dtype == torch.float32
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff <= atol, f"step {step}: max abs diff {diff:.2e} > {atol:.0e}"


def write_gguf(
    path: Path,
    hf_model: PreTrainedModel,
    arch: str,
    metadata: dict[str, int | float],
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
) -> Path:
    """Write `hf_model` as llama.cpp's converter would: GGUF names, llama q/k permuted, Gemma
    norms stored as `1 + w`. `tensor_types` maps a GGUF name fragment to its storage type
    (default F32)."""
    state = hf_model.state_dict()
    config = hf_model.config
    arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    name_map = get_tensor_name_map(arch_enum, config.num_hidden_layers)
    writer = GGUFWriter(path, arch)
    writer.add_pad_token_id(0)  # transformers' config defaults (Phi-3: 32000) exceed tiny vocabs
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in metadata.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if "q_proj" in base else config.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:])
            data = data.swapaxes(1, 2).reshape(tensor.shape)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        qtype = next(
            (t for frag, t in (tensor_types or {}).items() if frag in gguf_name and data.ndim == 2),
            GGMLQuantizationType.F32,
        )
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_gguf_metadata(config: PretrainedConfig) -> dict[str, int | float]:
    return {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.freq_base": float(config.rope_parameters["rope_theta"]),
        "rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "vocab_size": config.vocab_size,
    }


@pytest.fixture
def reference() -> type[Reference]:
    return Reference


class Reference:
    """The helpers above, handed to tests by the `reference` fixture."""

    build_hf_model = staticmethod(build_hf_model)
    save_hf_model = staticmethod(save_hf_model)
    load_ladle = staticmethod(load_ladle)
    load_ladle_gguf = staticmethod(load_ladle_gguf)
    hf_logits = staticmethod(hf_logits)
    ladle_logits = staticmethod(ladle_logits)
    assert_matches_transformers = staticmethod(assert_matches_transformers)
    write_gguf = staticmethod(write_gguf)
    llama_gguf_metadata = staticmethod(llama_gguf_metadata)
