"""Checkpoint tensors as `(hf_name, tensor)` pairs, from safetensors folders or GGUF files.

Architectures load by Hugging Face names only. GGUF tensors are renamed here and undone
where llama.cpp's converter changed them: Llama's q/k rows are un-permuted (a row shuffle,
so it works on raw quantized blocks), Gemma's norm weights lose the `+ 1` baked into them,
and RoPE factor tensors are left to `ModelConfig.from_gguf`, which reads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import GGUFFile
from ladle.engine.quant.ggml import GGMLTensor
from ladle.errors import ModelLoadError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_GGUF_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 have four norms per block; llama.cpp's `ffn_norm` is their pre-MLP one.
_GGUF_BLOCK_GEMMA2 = {
    **_GGUF_BLOCK,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_BLOCK_PHI3 = {**_GGUF_BLOCK, "ffn_up": "mlp.gate_up_proj"}  # [gate | up] rows
_GGUF_BLOCKS = {
    "gemma2": _GGUF_BLOCK_GEMMA2,
    "gemma3": _GGUF_BLOCK_GEMMA2,
    "gemma3_text": _GGUF_BLOCK_GEMMA2,
    "phi3": _GGUF_BLOCK_PHI3,
}
_ROPE_FACTOR_TENSORS = (
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
)
_GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text")
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def safetensors_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model.safetensors`, or of each shard its index lists, by name."""
    for path in _safetensors_files(Path(folder)):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, TypeError, ValueError, RuntimeError) as e:
            # safetensors checks the header against the file, but torch may still refuse what
            # it describes: a zero-size tensor with a dimension of 2**63 is a TypeError
            raise ModelLoadError(path, f"corrupt or truncated safetensors file ({e})") from e


def _safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.is_file():
        if (folder / SAFETENSORS_FILE).is_file():
            return [folder / SAFETENSORS_FILE]
        raise ModelLoadError(folder, f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
    return sorted(set(read_weight_map(index_path).values()))


def read_weight_map(index_path: Path) -> dict[str, Path]:
    """A sharded checkpoint's index: each tensor name and the shard holding it, every shard
    checked to be a file in the index's own folder (never `../` nor an absolute path)."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or not UTF-8
        raise ModelLoadError(index_path, f"malformed safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(index_path, "weight_map does not map tensor names to file names")
    shards = {}
    for file_name in set(weight_map.values()):
        path = index_path.parent / file_name
        if path.name != file_name or file_name == "..":  # never a file outside the folder
            raise ModelLoadError(index_path, f"shard {file_name!r} is not a file in the folder")
        if not path.is_file():
            raise ModelLoadError(path, f"shard listed in {SAFETENSORS_INDEX} is missing")
        shards[file_name] = path
    return {name: shards[file_name] for name, file_name in weight_map.items()}


def gguf_weights(
    gguf: GGUFFile, config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
    """Every tensor of a GGUF file under its Hugging Face name.

    Matrices stay `GGMLTensor`s (still quantized); vectors (norms, biases) arrive as float32
    tensors.
    """
    arch = config.architecture
    block_names = _GGUF_BLOCKS.get(arch, _GGUF_BLOCK)
    for gguf_name, tensor in gguf.tensors.items():
        if gguf_name in _ROPE_FACTOR_TENSORS:
            continue
        hf_name = _hf_name(gguf_name, block_names)
        if hf_name is None:
            raise ModelLoadError(gguf.path, f"tensor '{gguf_name}' has no {arch} counterpart")
        weight: torch.Tensor | GGMLTensor = tensor
        if arch == "llama":
            weight = _unpermute_qk(hf_name, weight, config, gguf.path)
        if len(tensor.shape) == 1:
            weight = weight.dequantize() if isinstance(weight, GGMLTensor) else weight
            if arch in _GEMMA and hf_name.endswith("norm.weight"):
                weight = weight - 1.0  # llama.cpp stores Gemma's norm scale as 1 + w
        yield hf_name, weight


def gguf_module_name(gguf_name: str, architecture: str) -> str | None:
    """The Hugging Face module a llama.cpp tensor name (`blk.0.attn_q.weight`) belongs to."""
    hf_name = _hf_name(gguf_name, _GGUF_BLOCKS.get(architecture, _GGUF_BLOCK))
    return None if hf_name is None else hf_name.rpartition(".")[0]


def _hf_name(gguf_name: str, block_names: dict[str, str]) -> str | None:
    module, _, param = gguf_name.rpartition(".")
    if module in _GGUF_TOP:
        return f"{_GGUF_TOP[module]}.{param}"
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in block_names:
        return None
    return f"model.layers.{match[1]}.{block_names[match[2]]}.{match[3]}"


def _unpermute_qk(
    hf_name: str, weight: torch.Tensor | GGMLTensor, config: ModelConfig, path: Path
) -> torch.Tensor | GGMLTensor:
    """Undo llama.cpp's interleaving of each q/k head's two rotary halves (rows only)."""
    if ".self_attn.q_proj." in hf_name:
        num_heads = config.num_attention_heads
    elif ".self_attn.k_proj." in hf_name:
        assert config.num_key_value_heads is not None
        num_heads = config.num_key_value_heads
    else:
        return weight
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ModelLoadError(path, f"{hf_name}: {rows} rows do not split into {num_heads} heads")
    # GGUF row (head, i, half) holds HF row (head, half, i): read HF rows from that layout.
    index = np.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).swapaxes(1, 2)
    index = index.reshape(-1)
    if isinstance(weight, GGMLTensor):
        return weight.permute_rows(index)
    return weight[torch.from_numpy(index)]


# llama.cpp's names for a BERT encoder -> the Hugging Face checkpoint's
_GGUF_ENCODER_TOP = {
    "token_embd": "embeddings.word_embeddings",
    "token_types": "embeddings.token_type_embeddings",
    "position_embd": "embeddings.position_embeddings",
    "token_embd_norm": "embeddings.LayerNorm",
}
_GGUF_ENCODER_BLOCK = {
    "attn_q": "attention.self.query",
    "attn_k": "attention.self.key",
    "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense",
    "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense",
    "layer_output_norm": "output.LayerNorm",
}


def gguf_encoder_weights(gguf: GGUFFile) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
    """Every tensor of a llama.cpp `bert` GGUF under its Hugging Face `BertModel` name."""
    for gguf_name, tensor in gguf.tensors.items():
        module, _, param = gguf_name.rpartition(".")
        match = _BLOCK_NAME.fullmatch(gguf_name)
        if module in _GGUF_ENCODER_TOP:
            hf_name = f"{_GGUF_ENCODER_TOP[module]}.{param}"
        elif match is not None and match[2] in _GGUF_ENCODER_BLOCK:
            hf_name = f"encoder.layer.{match[1]}.{_GGUF_ENCODER_BLOCK[match[2]]}.{match[3]}"
        else:
            raise ModelLoadError(gguf.path, f"tensor '{gguf_name}' has no bert counterpart")
        yield hf_name, tensor.dequantize() if len(tensor.shape) == 1 else tensor
