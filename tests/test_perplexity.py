"""Perplexity and full-sequence logits on the real SmolLM2, against transformers on the same GGUF.

The algorithm is checked exactly on dequantized (fp32) weights, where ladle and transformers
run the same numbers; the served int4 path is then checked within what its bf16 kernel costs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ladle import TextModelBuilder
from ladle.cli import main
from ladle.cores import text as text_core
from ladle.cores.text import ModelCore
from ladle.engine.loader import LoadedModel
from ladle.engine.loading.config import ModelConfig
from ladle.engine.loading.gguf import GGUFFile, read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.loading.weights import gguf_weights
from ladle.engine.models import ARCHITECTURES
from ladle.engine.quant.ggml import GGMLTensor
from ladle.errors import ContextLengthError, InvalidRequestError
from ladle.model import AsyncModel, Model
from ladle.perplexity import perplexity, sliding_windows

pytestmark = pytest.mark.real_model

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was "
    "reading, but it had no pictures or conversations in it, 'and what is the use of a "
    "book,' thought Alice 'without pictures or conversations?' So she was considering in "
    "her own mind (as well as she could, for the hot day made her feel very sleepy and "
    "stupid), whether the pleasure of making a daisy-chain would be worth the trouble of "
    "getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran "
    "close by her."
)  # 132 tokens: five windows of up to 48 tokens, 24 apart
CONTEXT, STRIDE = 48, 24


def test_sliding_windows_score_every_token_once_with_enough_context() -> None:
    for num_tokens, context, stride in [(106, 48, 24), (10, 48, 24), (100, 10, 3), (2, 2, 1)]:
        windows = sliding_windows(num_tokens, context, stride)
        targets = [t for w in windows for t in range(w.first_target, w.end)]
        assert targets == list(range(1, num_tokens))
        assert all(w.end - w.begin <= context for w in windows)
        assert all(w.first_target - w.begin >= context - stride for w in windows[1:])


@pytest.fixture(scope="module")
def gguf(smollm2_path: Path) -> GGUFFile:
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def dense_weights(gguf: GGUFFile) -> dict[str, torch.Tensor]:
    """SmolLM2's Q4_1 weights dequantized to fp32, under their Hugging Face names."""
    config = ModelConfig.from_gguf(gguf)
    return {
        n: w.dequantize() if isinstance(w, GGMLTensor) else w for n, w in gguf_weights(gguf, config)
    }


@pytest.fixture(scope="module")
def hf_model(gguf: GGUFFile, dense_weights: dict[str, torch.Tensor]) -> PreTrainedModel:
    """transformers' Llama on the same fp32 weights. Built from ladle's GGUF name mapping, which
    tests/engine/models/test_llama.py checks against transformers' own GGUF loader (40 s here,
    for the file's vocabulary parsed twice and a tensor map rebuilt per tensor)."""
    c = ModelConfig.from_gguf(gguf)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    )
    missing, unexpected = hf.load_state_dict(dense_weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    hf.tie_weights()
    return hf.eval()


@pytest.fixture(scope="module")
def model(smollm2_path: Path) -> Iterator[Model]:
    """SmolLM2 as `TextModelBuilder` serves it: Q4_1 through the int4 kernel."""
    with TextModelBuilder(smollm2_path).build() as m:
        yield m


@pytest.fixture(scope="module")
def dense_core(
    smollm2_path: Path, gguf: GGUFFile, dense_weights: dict[str, torch.Tensor]
) -> Iterator[ModelCore]:
    """A ladle core running the fp32 weights: transformers' numbers to float rounding."""

    def load() -> LoadedModel:
        config = ModelConfig.from_gguf(gguf)
        dense = ARCHITECTURES[config.architecture](config)
        dense.load_weights(dense_weights.items(), torch.float32)
        tokenizer = Tokenizer.from_gguf(gguf.metadata, smollm2_path)
        return LoadedModel(dense.eval(), tokenizer, config, smollm2_path, torch.float32, "gguf")

    # float32 keys and values: the float16 default rounds them, which moves the perplexity
    # by ~1e-4 relative (49.5987 against transformers' 49.6055 on an AVX2 machine)
    core = ModelCore.start(load, "smollm2-dense", 1, None, kv_cache_dtype=torch.float32)
    yield core
    core.engine.close()


@pytest.fixture(scope="module")
def dense_model(dense_core: ModelCore) -> Model:
    return Model(dense_core)


def transformers_perplexity(
    hf: PreTrainedModel, ids: list[int], context: int, stride: int
) -> float:
    """The strided loop of transformers' "Perplexity of fixed-length models" guide."""
    tokens = torch.tensor(ids)
    nll_sum, num_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        input_ids = tokens[begin:end]
        labels = input_ids.clone()
        labels[: -(end - prev_end)] = -100
        with torch.inference_mode():
            loss = hf(input_ids[None], labels=labels[None]).loss.item()
        valid = int((labels[1:] != -100).sum())
        nll_sum += loss * valid
        num_scored += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / num_scored)


def test_perplexity_on_dequantized_weights_equals_transformers(
    dense_model: Model, hf_model: PreTrainedModel
) -> None:
    ids = dense_model.tokenize(TEXT)
    assert len(sliding_windows(len(ids), CONTEXT, STRIDE)) > 2
    expected = transformers_perplexity(hf_model, ids, CONTEXT, STRIDE)
    result = perplexity(dense_model, TEXT, context_length=CONTEXT, stride=STRIDE)
    assert result.num_tokens == len(ids) - 1
    # float32 rounding only: 3e-8 relative measured (AMD EPYC, AVX2)
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert len(result.chunk_ppls) == len(sliding_windows(len(ids), CONTEXT, STRIDE))


def test_int4_perplexity_close_to_transformers(model: Model, hf_model: PreTrainedModel) -> None:
    """Q4_1 through the int4 kernel (bf16 activations) moves logits by ~2%, but perplexity
    averages that out: measured 0.07% off here, 0.01% over 767 tokens of Alice's chapter I.
    The bound leaves 7x headroom."""
    ids = model.tokenize(TEXT)
    expected = transformers_perplexity(hf_model, ids, CONTEXT, STRIDE)
    result = perplexity(model, TEXT, context_length=CONTEXT, stride=STRIDE)
    assert result.ppl == pytest.approx(expected, rel=5e-3)
    assert result.tokens_per_second > 0


def test_logits_for_rows_equal_raw_chat_logits_of_each_prefix(dense_model: Model) -> None:
    """A growing conversation's prompts are prefixes of the longest one: each raw chat
    request's logits are the longest prompt's row at that prefix's last token.

    Prompts of other lengths take matmuls of other row counts, whose last-bit differences the
    float16 KV cache rounds to whole float16 steps now and then: rows agree to 1.4e-3 measured
    (to 2e-4 with a float32 cache) on logits of magnitude ~20."""
    turns = ["What is the capital of France?", "Paris.", "And of Italy?", "Rome.", "Spain?"]
    conversations = [
        [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns[:n])
        ]
        for n in (1, 3, 5)
    ]
    raw = [dense_model.send_raw_chat_request(c) for c in conversations]
    longest = raw[-1][1]
    full = dense_model.logits_for(longest)
    assert full.shape == (len(longest), raw[0][0].shape[0]) and full.dtype == torch.float32
    for logits, prompt in raw:
        assert longest[: len(prompt)] == prompt
        torch.testing.assert_close(full[len(prompt) - 1], logits, atol=5e-3, rtol=0)


def test_logits_for_in_chunks_equals_one_pass(
    dense_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = dense_model.tokenize(TEXT)[:40]
    one_pass = dense_model.logits_for(ids)
    monkeypatch.setattr(text_core, "SCORE_CHUNK_SIZE", 16)  # three chunks through one cache
    torch.testing.assert_close(dense_model.logits_for(ids), one_pass, atol=1e-4, rtol=0)


def test_async_logits_for_mirrors_sync(dense_core: ModelCore, dense_model: Model) -> None:
    ids = dense_model.tokenize("One, two, three")
    async_model = AsyncModel(dense_core)  # the same core: closed once, by its fixture
    torch.testing.assert_close(
        asyncio.run(async_model.logits_for(ids)), dense_model.logits_for(ids)
    )


def test_bad_inputs_are_named(model: Model) -> None:
    with pytest.raises(InvalidRequestError, match="ids"):
        model.logits_for([])
    with pytest.raises(InvalidRequestError, match="ids"):
        model.logits_for([10**9])
    with pytest.raises(ContextLengthError, match="ids"):
        model.logits_for([1] * (model.max_sequence_length() + 1))
    with pytest.raises(InvalidRequestError, match="text: has 1 token"):
        perplexity(model, "Alice")
    with pytest.raises(InvalidRequestError, match="stride"):
        perplexity(model, TEXT, context_length=16, stride=16)
    with pytest.raises(InvalidRequestError, match="context_length"):
        perplexity(model, TEXT, context_length=10**9)


def test_cli_prints_perplexity_and_speed(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "alice.txt"
    file.write_text(TEXT)
    assert main(["perplexity", str(smollm2_path), str(file), "--context", "48"]) == 0
    out = capsys.readouterr().out
    assert "perplexity: " in out and "tokens/s" in out and "131 tokens" in out


def test_cli_quantizes_with_isq(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "alice.txt"
    file.write_text(TEXT)
    assert main(["perplexity", str(smollm2_path), str(file), "--isq", "q8_0"]) == 0
    assert ", ISQ q8_0 on" in capsys.readouterr().out
    assert main(["perplexity", str(smollm2_path), str(file), "--isq", "Q3"]) == 1
    assert "error: isq: unknown ISQ type 'Q3'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("  \n", "the file is empty"), ("Alice", "the text has 1 token")],
)
def test_cli_errors_name_the_file(
    smollm2_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    message: str,
) -> None:
    file = tmp_path / "input.txt"
    if content is not None:
        file.write_text(content)
    assert main(["perplexity", str(smollm2_path), str(file)]) == 1
    assert f"error: {file}: {message}" in capsys.readouterr().err
