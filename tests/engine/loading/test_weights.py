"""Checkpoint iterators: safetensors folders (single and sharded) and GGUF name translation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import GGUFFile
from ladle.engine.loading.weights import gguf_weights, safetensors_weights
from ladle.engine.quant.ggml import GGMLTensor
from ladle.errors import ModelLoadError


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(8, 4, generator=generator) for i in range(4)}


def test_single_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = dict(safetensors_weights(tmp_path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    tensors = _tensors()
    weight_map = {}
    for shard, names in enumerate(
        (["layer.0.weight", "layer.1.weight"], ["layer.2.weight", "layer.3.weight"])
    ):
        file_name = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names}, folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_sharded_index(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    loaded = dict(safetensors_weights(tmp_path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_missing_shard_is_named(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing") as e:
        list(safetensors_weights(tmp_path))
    assert e.value.path.endswith("model-00002-of-00002.safetensors")


def test_truncated_file_is_named(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as e:
        list(safetensors_weights(tmp_path))
    assert e.value.path.endswith("model.safetensors")


def test_empty_folder_and_bad_index(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        list(safetensors_weights(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed") as e:
        list(safetensors_weights(tmp_path))
    assert e.value.path.endswith("model.safetensors.index.json")


SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    eos_token_id=2,
)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def _f32(name: str, array: np.ndarray) -> GGMLTensor:
    data = np.ascontiguousarray(array, dtype=np.float32)
    rows = data.shape[0]
    return GGMLTensor(
        name, GGMLQuantizationType.F32, data.view(np.uint8).reshape(rows, -1), data.shape
    )


def _as_llama_cpp_writes_it(arch: str, hf_model) -> GGUFFile:
    """The model's tensors under GGUF names (transformers' own map, inverted), transformed as
    llama.cpp's converter transforms them: q/k rows permuted for llama, Gemma norms + 1."""
    config = hf_model.config
    gguf_to_hf = get_gguf_hf_weights_map(hf_model, TensorProcessor())
    hf_to_gguf = {hf: gguf for gguf, hf in gguf_to_hf.items()}
    tensors = {}
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.num_attention_heads if ".q_proj." in hf_name else 2
            data = data.reshape(heads, 2, -1, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        tensors[hf_to_gguf[hf_name]] = _f32(hf_to_gguf[hf_name], data)
    return GGUFFile(Path(f"{arch}.gguf"), {}, tensors)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gguf_names_and_transforms_match_transformers(arch: str) -> None:
    config_cls, model_cls = MODELS[arch]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**SHAPE, tie_word_embeddings=arch.startswith("gemma")))
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_()
    gguf = _as_llama_cpp_writes_it(arch, hf_model)
    config = ModelConfig.from_hf(json.loads(hf_model.config.to_json_string()))
    expected = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    got = dict(gguf_weights(gguf, config))
    assert got.keys() == expected.keys()
    for name, weight in got.items():
        if len(weight.shape) == 1:
            assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
        dense = weight.dequantize() if isinstance(weight, GGMLTensor) else weight
        torch.testing.assert_close(dense, expected[name], atol=1e-6, rtol=0, msg=name)


def test_llama_unpermute_works_on_quantized_blocks() -> None:
    config = ModelConfig("llama", 64, 64, 96, 1, 4, num_key_value_heads=2)
    hf_rows = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)  # k_proj
    gguf_rows = hf_rows.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64)
    blocks = quantize(gguf_rows, GGMLQuantizationType.Q8_0)
    tensor = GGMLTensor("blk.0.attn_k.weight", GGMLQuantizationType.Q8_0, blocks, (32, 64))
    gguf = GGUFFile(Path("q8.gguf"), {}, {"blk.0.attn_k.weight": tensor})
    ((name, weight),) = gguf_weights(gguf, config)
    assert name == "model.layers.0.self_attn.k_proj.weight"
    assert isinstance(weight, GGMLTensor) and weight.ggml_type == GGMLQuantizationType.Q8_0
    # Each row keeps its own blocks, so this is exactly the un-permuted dequantized tensor.
    expected = tensor.dequantize().numpy().reshape(2, 8, 2, 64).swapaxes(1, 2).reshape(32, 64)
    np.testing.assert_array_equal(weight.dequantize().numpy(), expected)
    np.testing.assert_allclose(expected, hf_rows, atol=0.05)


def test_rope_factor_tensors_are_left_to_the_config_and_unknown_ones_fail() -> None:
    config = ModelConfig("llama", 64, 64, 96, 1, 4)
    factors = _f32("rope_freqs.weight", np.ones(4))
    norm = _f32("output_norm.weight", np.ones(64))
    gguf = GGUFFile(Path("x.gguf"), {}, {"rope_freqs.weight": factors, "output_norm.weight": norm})
    assert [n for n, _ in gguf_weights(gguf, config)] == ["model.norm.weight"]
    gguf.tensors["blk.0.ssm_conv1d.weight"] = norm
    with pytest.raises(ModelLoadError, match="ssm_conv1d") as e:
        list(gguf_weights(gguf, config))
    assert e.value.path == "x.gguf"
