"""A model folder's sentence-transformers metadata: its pooling, normalization and length.

sentence-transformers describes the pipeline after the transformer in `modules.json`: a
`Pooling` module whose `config.json` names the pooling mode, an optional `Normalize` module,
and `sentence_bert_config.json` with `max_seq_length` (often shorter than the model's
positions: all-MiniLM-L6-v2 was trained on 256 of its 512). A folder without them gets the
family's default pooling and no normalization, as sentence-transformers would give it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ladle.engine.pooling import Pooling
from ladle.errors import ModelLoadError

# sentence-transformers' pooling flags and mode names -> ladle's modes
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
_POOLING_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}
_UNSUPPORTED_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    pooling: Pooling
    max_seq_len: int | None  # sentence-transformers' max_seq_length, if the folder has one


def read_embedding_spec(folder: Path, default_mode: str) -> EmbeddingSpec:
    """The folder's pooling and length; `default_mode` when it has no `modules.json`."""
    modules_file = folder / "modules.json"
    mode, normalize = default_mode, False
    if modules_file.is_file():
        modules = _read(modules_file)
        if not isinstance(modules, list):
            raise ModelLoadError(modules_file, "must be a JSON list of modules")
        for module in modules:
            kind = str(module.get("type", "")).rpartition(".")[2]
            if kind not in _KNOWN_MODULES:
                raise ModelLoadError(
                    modules_file, f"module type '{module.get('type')}' is not supported"
                )
            if kind == "Pooling":
                mode = _pooling_mode(folder / str(module.get("path", "")) / "config.json")
            normalize |= kind == "Normalize"
    st_config = folder / "sentence_bert_config.json"
    max_seq_len = _read(st_config).get("max_seq_length") if st_config.is_file() else None
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ModelLoadError(st_config, "max_seq_length: must be a positive integer")
    return EmbeddingSpec(Pooling(mode, normalize), max_seq_len)


def _pooling_mode(file: Path) -> str:
    config = _read(file)
    if isinstance(config.get("pooling_mode"), str):
        name = config["pooling_mode"]
        if name not in _POOLING_NAMES:
            raise ModelLoadError(file, f"pooling_mode: '{name}' is not supported")
        return _POOLING_NAMES[name]
    unsupported = [flag for flag in _UNSUPPORTED_FLAGS if config.get(flag)]
    if unsupported:
        raise ModelLoadError(file, f"{unsupported[0]}: this pooling is not supported")
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1:
        raise ModelLoadError(file, f"exactly one pooling mode must be set, found {modes or 'none'}")
    return modes[0]


def _read(file: Path) -> Any:
    if not file.is_file():
        raise ModelLoadError(file, "missing (named by modules.json)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(file, f"cannot read JSON ({e})") from e
