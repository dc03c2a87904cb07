"""Turn a path on disk into a ready model: config, weights, tokenizer, chat template.

Two layouts are understood: a GGUF file (everything in one file), and a Hugging Face folder
(`config.json`, safetensors weights, `tokenizer.json`). A folder holding GGUF files is read
through the file named by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_weights, safetensors_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.models.base import CausalLM, CheckpointModule, Weight
from ladle.errors import ModelLoadError, UnsupportedArchitectureError


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    dtype: torch.dtype
    file_format: str  # "gguf" or "safetensors"


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    tokenizer_path: str | Path | None = None,
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face safetensors folder."""
    path = Path(path).expanduser()
    if path.is_file():
        loaded = _load_gguf(path, dtype)
    elif path.is_dir():
        loaded = _load_folder(path, dtype)
    else:
        raise ModelLoadError(path, "no such file or directory")
    if tokenizer_path is not None:
        loaded.tokenizer = Tokenizer.from_folder(Path(tokenizer_path))
    if chat_template is not None:
        loaded.tokenizer.chat_templates["default"] = _read_template(chat_template)
    return loaded


def _build(config: ModelConfig, path: Path) -> CausalLM:
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(
            path,
            f"architecture {config.architecture!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})",
        )
    return cls(config)


def load_checkpoint(
    model: CheckpointModule, weights: Iterable[tuple[str, Weight]], dtype: torch.dtype, path: Path
) -> None:
    """Load, naming the model's file in errors that only knew the tensor."""
    try:
        model.load_weights(weights, dtype)
    except ModelLoadError as e:
        if e.path.startswith(str(path)):
            raise
        raise type(e)(path, f"{e.path}: {e.reason}") from e


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    gguf = read_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    model = _build(config, path)
    load_checkpoint(model, gguf_weights(gguf, config), dtype, path)
    tokenizer = Tokenizer.from_gguf(gguf.metadata, path)
    return LoadedModel(model.eval(), tokenizer, config, path, dtype, "gguf")


def _load_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
        raise ModelLoadError(path, "no config.json (and not exactly one .gguf file) in folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(config_file, f"invalid JSON ({e})") from e
    config = ModelConfig.from_hf(raw, config_file)
    model = _build(config, path)
    load_checkpoint(model, safetensors_weights(path), dtype, path)
    tokenizer = Tokenizer.from_folder(path)
    return LoadedModel(model.eval(), tokenizer, config, path, dtype, "safetensors")


def _read_template(template: str) -> str:
    """A chat template given inline, as a `.jinja` file, or as a tokenizer_config-style JSON."""
    candidate = Path(template)
    if len(template) < 4096 and candidate.is_file():
        text = candidate.read_text()
        if candidate.suffix == ".json":
            return str(json.loads(text)["chat_template"])
        return text
    return template
