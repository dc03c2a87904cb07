"""Bad model files fail at load with one clear ladle error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from ladle import (
    GgufModelBuilder,
    ModelLoadError,
    TextModelBuilder,
    UnsupportedArchitectureError,
)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere"):
        TextModelBuilder(tmp_path / "nowhere").build()


def test_text_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "readme.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"readme\.txt"):
        GgufModelBuilder(tmp_path, "readme.txt").build()


def test_truncated_real_model(tmp_path: Path, smollm2_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as f:
        cut.write_bytes(f.read(50_000_000))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        TextModelBuilder(cut).build()


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"mamba\.gguf.*'mamba'"):
        TextModelBuilder(path).build()


def test_unknown_architecture_in_folder(tmp_path: Path) -> None:
    config = {
        "model_type": "rwkv",
        "architectures": ["RwkvForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="rwkv"):
        TextModelBuilder(tmp_path).build()


def test_folder_with_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        TextModelBuilder(tmp_path).build()
