"""Turn a path on disk into a ready embedding model: weights, tokenizer, pooling, length.

Encoders (BERT, RoBERTa, XLM-R) come from a Hugging Face folder (with sentence-transformers
metadata, usually) or a llama.cpp `bert` GGUF; decoder embedders (Qwen3-Embedding) load
through the chat architectures and pool their last hidden states. A GGUF carries no
sentence-transformers metadata: its `<arch>.pooling_type` gives the pooling, and vectors are
normalized, as llama.cpp serves them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ladle.engine.embedder import Embedder
from ladle.engine.loader import IsqRequest, isq_spec, load_checkpoint
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.encoder_config import (
    ENCODER_ARCHITECTURES,
    GGUF_ENCODER_ARCHITECTURES,
    EncoderConfig,
)
from ladle.engine.loading.gguf import GGUFFile, read_gguf
from ladle.engine.loading.sentence_transformers import EmbeddingSpec, read_embedding_spec
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_encoder_weights, gguf_weights, safetensors_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.models.base import CausalLM, Weight
from ladle.engine.models.bert import BertModel
from ladle.engine.pooling import Pooling
from ladle.engine.quant.isq import parse_isq_type
from ladle.errors import ModelLoadError

_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp's LLAMA_POOLING_TYPE_*


@dataclass
class LoadedEmbedder:
    embedder: Embedder
    tokenizer: Tokenizer
    architecture: str
    max_seq_len: int  # the longest input the model was trained (or positioned) for
    path: Path
    file_format: str  # "gguf" or "safetensors"


def load_embedder(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_num_seqs: int = 32,
    tokenizer_path: str | Path | None = None,
    isq: str | None = None,
    imatrix: str | Path | None = None,
) -> LoadedEmbedder:
    """Load an embedding model from a GGUF file or a Hugging Face folder.

    `isq` quantizes its linear layers as they load (`quant/isq.py`), weighted by `imatrix`.
    """
    path = Path(path).expanduser()
    if imatrix is not None and isq is None:
        raise ModelLoadError(imatrix, "an importance matrix needs an ISQ type to weight")
    request = (parse_isq_type(isq), imatrix) if isq is not None else None
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(path, "no config.json (and not exactly one .gguf file) in folder")
        path = ggufs[0]
    if path.is_file():
        gguf = read_gguf(path)
        model, spec, max_len = _from_gguf(gguf, dtype, request)
        tokenizer = _gguf_tokenizer(gguf, tokenizer_path)
        file_format = "gguf"
    elif path.is_dir():
        model, spec, max_len = _from_folder(path, dtype, request)
        tokenizer = Tokenizer.from_folder(Path(tokenizer_path or path))
        file_format = "safetensors"
    else:
        raise ModelLoadError(path, "no such file or directory")
    max_seq_len = min(spec.max_seq_len or max_len, max_len)
    embedder = Embedder(model.eval(), spec.pooling, dtype, max_num_seqs)
    arch = model.config.architecture
    return LoadedEmbedder(embedder, tokenizer, arch, max_seq_len, path, file_format)


def is_embedding_model(path: Path) -> bool:
    """Whether `path` holds an encoder or a sentence-transformers model (not a chat model)."""
    if path.is_dir():
        if (path / "modules.json").is_file():
            return True
        config = path / "config.json"
        if config.is_file():
            return _is_encoder(_read_config(config))
        path = next(iter(sorted(path.glob("*.gguf"))), path)
    if path.is_file() and path.suffix == ".gguf":
        gguf = read_gguf(path)
        return gguf.architecture in GGUF_ENCODER_ARCHITECTURES or bool(gguf.get("pooling_type"))
    return False


def _read_config(config_file: Path) -> dict[str, Any]:
    """A folder's config.json, which must be a JSON object; else an error naming the file."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ModelLoadError(config_file, f"invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(config_file, "not a JSON object")
    return raw


def _is_encoder(raw: dict[str, Any]) -> bool:
    model_type = raw.get("model_type")
    return isinstance(model_type, str) and model_type in ENCODER_ARCHITECTURES


def _from_folder(
    path: Path, dtype: torch.dtype, request: IsqRequest
) -> tuple[BertModel | CausalLM, EmbeddingSpec, int]:
    config_file = path / "config.json"
    raw = _read_config(config_file)
    if _is_encoder(raw):
        config = EncoderConfig.from_hf(raw, config_file)
        encoder = BertModel(config)
        isq = isq_spec(request, config.architecture)
        load_checkpoint(encoder, safetensors_weights(path), dtype, path, isq)
        return encoder, read_embedding_spec(path, "mean"), config.max_seq_len
    decoder = _decoder(ModelConfig.from_hf(raw, config_file))
    isq = isq_spec(request, decoder.config.architecture)
    load_checkpoint(decoder, _decoder_names(safetensors_weights(path)), dtype, path, isq)
    return decoder, read_embedding_spec(path, "last"), decoder.config.max_position_embeddings


def _from_gguf(
    gguf: GGUFFile, dtype: torch.dtype, request: IsqRequest
) -> tuple[BertModel | CausalLM, EmbeddingSpec, int]:
    isq = isq_spec(request, gguf.architecture)
    if gguf.architecture in GGUF_ENCODER_ARCHITECTURES:
        config = EncoderConfig.from_gguf(gguf)
        model: BertModel | CausalLM = BertModel(config)
        load_checkpoint(model, gguf_encoder_weights(gguf), dtype, gguf.path, isq)
        default, max_len = "mean", config.max_seq_len
    else:
        model = _decoder(ModelConfig.from_gguf(gguf))
        load_checkpoint(model, gguf_weights(gguf, model.config), dtype, gguf.path, isq)
        default, max_len = "last", model.config.max_position_embeddings
    pooling_type = gguf.get("pooling_type") or 0  # 0: none given, the family's default
    if not isinstance(pooling_type, int) or (pooling_type and pooling_type not in _GGUF_POOLING):
        raise ModelLoadError(
            gguf.path, f"{gguf.architecture}.pooling_type: {pooling_type} is not supported"
        )
    mode = _GGUF_POOLING.get(pooling_type, default)
    return model, EmbeddingSpec(Pooling(mode, normalize=True), None), max_len


def _decoder(config: ModelConfig) -> CausalLM:
    """A chat architecture whose head, never used here, shares the embedding table."""
    return ARCHITECTURES[config.architecture](replace(config, tie_word_embeddings=True))


def _decoder_names(weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
    """Names of a checkpoint saved as the bare decoder (Qwen3-Embedding: `layers.0...`)."""
    for name, weight in weights:
        yield (name if name.startswith(("model.", "lm_head.")) else f"model.{name}"), weight


def _gguf_tokenizer(gguf: GGUFFile, tokenizer_path: str | Path | None) -> Tokenizer:
    if tokenizer_path is not None:
        return Tokenizer.from_folder(Path(tokenizer_path))
    return Tokenizer.from_gguf(gguf.metadata, gguf.path)
