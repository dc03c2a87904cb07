"""A Hugging Face safetensors folder in llama.cpp's GGUF terms, as `convert_hf_to_gguf.py`
writes it: the architecture and its hyperparameter keys, and the tensors under GGUF names.

Names come from the `gguf` package's `TensorNameMap`, llama.cpp's own table, so they are the
ones ladle's GGUF loader maps back (`loading/weights.py`). The `llama` architecture (Llama,
Mistral) has each q/k head's rows permuted from rotary halves to interleaved pairs, biases
too: `LlamaModel.permute`, which `loading/weights.py: _unpermute_qk` undoes. Llama 3's RoPE
factors become the `rope_freqs` tensor llama.cpp computes. Folders of other architectures
(Phi-3, Gemma) are refused by name: their SentencePiece tokenizers are built by llama.cpp
from `tokenizer.model` scores, which `hf_vocab.py` does not reproduce.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGUFWriter,
    PoolingType,
    RopeScalingType,
    get_tensor_name_map,
)
from safetensors import SafetensorError, safe_open

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.encoder_config import EncoderConfig
from ladle.engine.loading.sentence_transformers import read_embedding_spec
from ladle.engine.loading.weights import SAFETENSORS_FILE, SAFETENSORS_INDEX, read_weight_map
from ladle.engine.quant.hf_vocab import write_tokenizer
from ladle.errors import ModelLoadError, UnsupportedArchitectureError

# Hugging Face `model_type` -> llama.cpp architecture
HF_ARCHITECTURES = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "bert": MODEL_ARCH.BERT,
}
_POOLING = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "last": PoolingType.LAST}
# Checkpoint tensors llama.cpp's converter drops: buffers, BERT's pooler and training heads.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", "embeddings.position_ids")
_SKIPPED_BERT = ("pooler.", "cls.")

TensorLoader = Callable[[], torch.Tensor]


@dataclass
class HFFolder:
    """A safetensors folder's config, read for writing it as GGUF."""

    path: Path
    raw: dict[str, Any]  # config.json
    arch: MODEL_ARCH

    @property
    def gguf_architecture(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]

    def write_metadata(self, writer: GGUFWriter) -> None:
        """Name, hyperparameters and tokenizer, under llama.cpp's keys."""
        writer.add_name(self.path.name)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        if self.arch == MODEL_ARCH.BERT:
            _bert_hparams(writer, EncoderConfig.from_hf(self.raw, self.path), self.path)
        else:
            _decoder_hparams(writer, self.raw, self._decoder_config())
        write_tokenizer(writer, self.path, int(self.raw["vocab_size"]))

    def tensors(self) -> dict[str, TensorLoader]:
        """Every tensor to write, by GGUF name, each loaded (as float32) only when called."""
        name_map = get_tensor_name_map(self.arch, int(self.raw["num_hidden_layers"]))
        loaders: dict[str, TensorLoader] = {}
        for hf_name, file in _checkpoint_names(self.path).items():
            name = hf_name.removeprefix("bert.") if self.arch == MODEL_ARCH.BERT else hf_name
            if name.endswith(_SKIPPED_SUFFIXES) or (
                self.arch == MODEL_ARCH.BERT and name.startswith(_SKIPPED_BERT)
            ):
                continue
            gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ModelLoadError(
                    file, f"tensor '{hf_name}' has no {self.gguf_architecture} GGUF name"
                )
            loaders[gguf_name] = _loader(file, hf_name, self._rows_permutation(name))
        if self.arch == MODEL_ARCH.LLAMA:
            loaders.update(_rope_freqs(self._decoder_config()))
        return loaders

    def _decoder_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.raw, self.path / "config.json")

    def _rows_permutation(self, name: str) -> int | None:
        """The head count whose rows llama.cpp permutes in this tensor, if any."""
        if self.arch != MODEL_ARCH.LLAMA:
            return None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return int(self.raw["num_attention_heads"])
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return int(self.raw.get("num_key_value_heads") or self.raw["num_attention_heads"])
        return None


def read_hf_folder(path: Path) -> HFFolder:
    """The folder's config; an architecture GGUF cannot be written for is an error naming it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(path, "no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(config_file, f"invalid JSON ({e})") from e
    model_type = raw.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            config_file,
            f"architecture '{model_type}' cannot be written to GGUF from a safetensors folder "
            f"(supported: {', '.join(HF_ARCHITECTURES)})",
        )
    return HFFolder(path, raw, HF_ARCHITECTURES[model_type])


def _decoder_hparams(writer: GGUFWriter, raw: dict[str, Any], config: ModelConfig) -> None:
    """`TextModel.set_gguf_parameters`, plus `LlamaModel`'s vocab size and rotary width."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    assert config.num_key_value_heads is not None and config.head_dim is not None
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if raw.get("head_dim") is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if writer.arch == MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
    _rope_scaling(writer, config)


def _rope_scaling(writer: GGUFWriter, config: ModelConfig) -> None:
    scaling = config.rope_scaling
    rope_type = scaling["rope_type"] if scaling else None
    if rope_type is None or rope_type == "llama3":  # llama3: the rope_freqs tensor
        return
    if rope_type not in ("linear", "yarn"):
        raise ModelLoadError(
            config.path, f"rope_scaling: '{rope_type}' has no form llama.cpp reads for this model"
        )
    assert scaling is not None
    writer.add_rope_scaling_type(RopeScalingType(rope_type))
    writer.add_rope_scaling_factor(scaling["factor"])
    if rope_type == "yarn":
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if scaling.get(key) is not None:
                add(scaling[key])


def _rope_freqs(config: ModelConfig) -> dict[str, TensorLoader]:
    """Llama 3's frequency factors, as `LlamaModel.generate_extra_tensors` computes them."""
    scaling = config.rope_scaling
    if not scaling or scaling["rope_type"] != "llama3":
        return {}
    assert config.head_dim is not None
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    # the rope dict's value, as transformers reads it (llama.cpp reads a top-level one, default
    # 8192: the same on Llama 3.x, whose configs state 8192 in the dict only)
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    tensor = torch.tensor(factors, dtype=torch.float32)
    return {"rope_freqs.weight": lambda: tensor}


def _bert_hparams(writer: GGUFWriter, config: EncoderConfig, folder: Path) -> None:
    """`BertModel.set_gguf_parameters`: no causal mask, the sentence-transformers pooling."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_token_type_count(config.type_vocab_size)
    mode = read_embedding_spec(folder, "mean").pooling.mode
    if mode not in _POOLING:
        raise ModelLoadError(folder, f"pooling '{mode}' has no llama.cpp pooling type")
    writer.add_pooling_type(_POOLING[mode])


def _checkpoint_names(folder: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint and the shard file holding it."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return read_weight_map(index)
    if not (folder / SAFETENSORS_FILE).is_file():
        raise ModelLoadError(folder, f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
    with _open(folder / SAFETENSORS_FILE) as f:
        return dict.fromkeys(f.keys(), folder / SAFETENSORS_FILE)


def _loader(file: Path, name: str, permuted_heads: int | None) -> TensorLoader:
    def load() -> torch.Tensor:
        try:
            with _open(file) as f:
                tensor: torch.Tensor = f.get_tensor(name).to(torch.float32)
        except SafetensorError as e:
            raise ModelLoadError(file, f"cannot read tensor '{name}' ({e})") from e
        if permuted_heads is None:
            return tensor
        # llama.cpp's LlamaModel.permute: each head's rows from (half, i) to (i, half)
        rows = tensor.shape[0]
        split = tensor.reshape(permuted_heads, 2, rows // permuted_heads // 2, *tensor.shape[1:])
        return split.swapaxes(1, 2).reshape(tensor.shape)

    return load


def _open(file: Path) -> Any:
    if not file.is_file():
        raise ModelLoadError(file, f"shard listed in {SAFETENSORS_INDEX} is missing")
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ModelLoadError(file, f"corrupt or truncated safetensors file ({e})") from e
