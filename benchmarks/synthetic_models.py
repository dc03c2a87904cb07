"""Real-size Gemma 3 270M and Qwen 3 0.6B with random weights, as Q4_K_M-style GGUF files.

Speed does not depend on weight values, so `bench_engine.py` measures these two shapes
without downloading them. Each is built once into `~/.cache/ladle-bench/` (`$XDG_CACHE_HOME`):
1. a Hugging Face folder: transformers' `Gemma3ForCausalLM` / `Qwen3ForCausalLM` at the real
   configs, initialised as transformers does (linear and embedding weights normal with std
   0.02, norms at their neutral scale of 1), saved in bfloat16 with `save_pretrained`, plus
   SmolLM2's tokenizer (49,152 byte-level BPE tokens, saved by transformers from the SmolLM2
   GGUF: the only real tokenizer available offline; both vocabularies are larger, and llama.cpp
   and ladle pad the rest as unused ids);
2. `ladle quantize --type Q4K` into `<name>-Q4_K_M.gguf`: Q4_K weights and a Q6_K head, and
   where a row width is no multiple of 256 ladle's 32-block fallbacks (`quant/isq.py`): Q4_1
   for weights (llama-quantize writes Q5_0) and Q8_0 for the head. Every 640-wide row of
   Gemma falls back (q/k/v, gate/up and the tied embedding); Qwen 3 is Q4_K and Q6_K only.
Qwen 3 is quantized from its folder. ladle's folder route refuses `gemma3` (`hf_gguf.py` writes
only llama, mistral, qwen2, qwen3 and bert folders), so Gemma 3's folder is first written as
an F16 GGUF here, as llama.cpp's `convert_hf_to_gguf.py` writes Gemma 3 (its keys, its tensor
names, norms stored as 1 + w), and `ladle quantize` quantizes that file.
A finished file is checked to load in llama.cpp when `--peer-python` has `llama_cpp`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import MODEL_ARCH, GGUFWriter, LlamaFileType, get_tensor_name_map
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ladle.engine.quant.hf_vocab import write_tokenizer
from ladle.store.catalog import DEFAULT_CHAT_MODEL, resolve

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ladle-bench"
GEMMA3_GLOBAL_THETA = 1_000_000.0  # RoPE base of the full-attention layers


def gemma3_270m() -> Gemma3TextConfig:
    layer_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": GEMMA3_GLOBAL_THETA},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=256,
        tie_word_embeddings=True,
        initializer_range=0.02,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def qwen3_0_6b() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=151643,
        eos_token_id=151645,
    )


# name -> (config, model class)
SYNTHETIC: dict[str, tuple[Callable[[], PretrainedConfig], type[PreTrainedModel]]] = {
    "gemma3-270m": (gemma3_270m, Gemma3ForCausalLM),
    "qwen3-0.6b": (qwen3_0_6b, Qwen3ForCausalLM),
}


def synthetic_gguf(name: str, peer_python: str) -> Path:
    """The cached Q4_K_M-style file of `name` (a key of `SYNTHETIC`), built on first use."""
    out = CACHE / f"{name}-Q4_K_M.gguf"
    if out.exists():
        return out
    folder = hf_folder(name)
    source = folder if name != "gemma3-270m" else gemma3_f16_gguf(folder)
    partial = out.with_suffix(".partial")
    quantize = [sys.executable, "-m", "ladle", "quantize", str(source), "--type", "Q4K"]
    subprocess.run([*quantize, "--out", str(partial)], check=True)
    partial.rename(out)
    print(f"{name}: {llama_cpp_check(peer_python, out)}", file=sys.stderr)
    return out


def hf_folder(name: str) -> Path:
    """A transformers folder at the real config with random weights and SmolLM2's tokenizer."""
    folder = CACHE / name
    if (folder / "config.json").exists():
        return folder
    config_of, model_class = SYNTHETIC[name]
    print(f"{name}: random weights at the real size ...", file=sys.stderr)
    torch.manual_seed(0)
    model = model_class(config_of()).to(torch.bfloat16)  # transformers' own init: std 0.02
    partial = CACHE / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(tokenizer_folder(), partial)
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def tokenizer_folder() -> Path:
    """SmolLM2's tokenizer as transformers saves it from the SmolLM2 GGUF (no download)."""
    folder = CACHE / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").exists():
        gguf = resolve(DEFAULT_CHAT_MODEL)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def gemma3_f16_gguf(folder: Path) -> Path:
    """The folder as `convert_hf_to_gguf.py` writes Gemma 3: F16 matrices, F32 norms as 1 + w."""
    out = CACHE / "gemma3-270m-F16.gguf"
    if out.exists():
        return out
    raw = json.loads((folder / "config.json").read_text())
    partial = out.with_suffix(".partial")
    writer = GGUFWriter(partial, "gemma3")
    writer.add_name(folder.name)
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(raw["num_attention_heads"])
    writer.add_head_count_kv(raw["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    writer.add_key_length(raw["head_dim"])
    writer.add_value_length(raw["head_dim"])
    writer.add_rope_freq_base(GEMMA3_GLOBAL_THETA)  # llama.cpp fixes the sliding layers' 1e4
    writer.add_sliding_window(raw["sliding_window"])
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    write_tokenizer(writer, folder, raw["vocab_size"])
    names = get_tensor_name_map(MODEL_ARCH.GEMMA3, raw["num_hidden_layers"])
    for hf_name, tensor in load_file(folder / "model.safetensors").items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if hf_name.endswith("norm.weight"):
            writer.add_tensor(gguf_name, (tensor.float() + 1.0).numpy())  # Gemma scales by 1 + w
        else:
            writer.add_tensor(gguf_name, tensor.to(torch.float16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def llama_cpp_check(peer_python: str, path: Path) -> str:
    """Whether llama.cpp loads `path` and runs a token through it, in `peer_python`."""
    code = (
        "import sys; from llama_cpp import Llama; "
        "llm = Llama(sys.argv[1], n_ctx=64, verbose=False); llm.eval([10, 20, 30])"
    )
    proc = subprocess.run(
        [peer_python, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode == 0:
        return f"llama.cpp loads {path.name}"
    last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return f"llama.cpp does NOT load {path.name}: {last}"
