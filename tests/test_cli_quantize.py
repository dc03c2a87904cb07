"""`ladle quantize`: SmolLM2 written as Q8_0 and Q4K GGUF files that ladle and transformers read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from tokenizers import Tokenizer, models

from ladle import GgufModelBuilder, Model
from ladle.cli import main
from ladle.engine.loading.gguf import read_gguf

T = GGMLQuantizationType
PROMPT = "The quick brown fox jumps over the lazy dog. It was a sunny day, and"

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def source(smollm2_path: Path) -> Iterator[tuple[Model, list[int], torch.Tensor]]:
    with GgufModelBuilder(smollm2_path).build() as model:
        ids = model.tokenize(PROMPT)
        yield model, ids, model.logits_for(ids)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# isq type -> (the type of a 576-wide and of the 1536-wide ffn_down weight, logit tolerance).
# A K-quant needs widths in 256s, so SmolLM2's 576-wide layers fall back to Q4_1, as llama.cpp
# falls back. Measured relative logit error against the Q4_1 source: Q8_0 6.7% (see
# tests/test_isq.py: this model is that sensitive), Q4K 6.2% (its Q4_1 layers find the source's
# own grid again). transformers 4.x loads the Q8_0 file too (checked once: top-1 tokens agree
# with ladle's on > 90% of the prompt; left out of the suite, it takes ~50 s).
CASES = {"Q8_0": (T.Q8_0, T.Q8_0, 0.1), "Q4K": (T.Q4_1, T.Q4_K, 0.1)}


@pytest.fixture(scope="module")
def written(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quantized")
    files = {}
    for isq_type in CASES:
        out = folder / f"smollm2-{isq_type}.gguf"
        assert main(["quantize", str(smollm2_path), "--type", isq_type, "--out", str(out)]) == 0
        files[isq_type] = out
    return files


@pytest.mark.parametrize("isq_type", list(CASES))
def test_quantized_file_loads_and_stays_close(
    smollm2_path: Path,
    written: dict[str, Path],
    source: tuple[Model, list[int], torch.Tensor],
    isq_type: str,
) -> None:
    out = written[isq_type]
    narrow, wide, tolerance = CASES[isq_type]
    gguf = read_gguf(out)
    original = read_gguf(smollm2_path)
    assert gguf.tensors["blk.0.attn_q.weight"].ggml_type == narrow
    assert gguf.tensors["blk.0.ffn_down.weight"].ggml_type == wide
    assert gguf.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32
    embedding = gguf.tensors["token_embd.weight"]  # kept: Q8_0 in the source already
    assert embedding.ggml_type == T.Q8_0
    assert (embedding.data == original.tensors["token_embd.weight"].data).all()
    assert gguf.metadata["tokenizer.chat_template"] == original.metadata["tokenizer.chat_template"]
    assert gguf.metadata["tokenizer.ggml.tokens"] == original.metadata["tokenizer.ggml.tokens"]
    _, ids, want = source
    with GgufModelBuilder(out).build() as model:
        got = model.logits_for(ids)
        assert model.send_chat_request(
            {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}
        )
    assert relative(got, want) < tolerance


def test_hqq_types_and_unwritable_sources_are_clear_errors(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.gguf")
    assert main(["quantize", str(smollm2_path), "--type", "HQQ4", "--out", out]) == 1
    assert "HQQ4 cannot be written to GGUF" in capsys.readouterr().err
    assert main(["quantize", str(smollm2_path), "--type", "Q3", "--out", out]) == 1
    assert "unknown ISQ type 'Q3'" in capsys.readouterr().err
    folder = tmp_path / "model"
    folder.mkdir()
    assert main(["quantize", str(folder), "--type", "Q4K", "--out", out]) == 1
    assert "no config.json: not a Hugging Face model folder" in capsys.readouterr().err
    config = {"model_type": "phi3", "vocab_size": 64, "hidden_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["quantize", str(folder), "--type", "Q4K", "--out", out]) == 1
    assert "architecture 'phi3' cannot be written to GGUF" in capsys.readouterr().err
    config |= {"model_type": "llama", "intermediate_size": 64, "num_hidden_layers": 1}
    (folder / "config.json").write_text(json.dumps(config | {"num_attention_heads": 2}))
    sentencepiece_style = Tokenizer(models.BPE({"a": 0, "<0x61>": 1}, [], byte_fallback=True))
    sentencepiece_style.save(str(folder / "tokenizer.json"))
    assert main(["quantize", str(folder), "--type", "Q4K", "--out", out]) == 1
    assert "a BPE with byte fallback tokenizer cannot be written" in capsys.readouterr().err
    assert not Path(out).exists()
