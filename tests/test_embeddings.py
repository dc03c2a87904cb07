"""The embedding API on the real all-MiniLM-L6-v2, against sentence-transformers.

sentence-transformers (a test-only dependency) is the reference: same folder, same CPU, its
own tokenizer, pooling and normalization. Every vector must have cosine similarity >= 0.9999
with its counterpart over a corpus mixing lengths (so padding matters), scripts, code and
duplicates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from ladle import (
    ContextLengthError,
    EmbeddingModelBuilder,
    EmbeddingRequestBuilder,
    InvalidRequestError,
    Model,
)

CORPUS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Paris is the capital of France.",
    "Berlin ist die Hauptstadt von Deutschland.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "naïve café résumé coöperate façade",
    "emoji 😀🚀🔥 and symbols ∑∫√ ≠ ≤",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "   leading and trailing spaces   ",
    "",
    ".",
    "a",
    "?!",
    "hello world",  # duplicate
    "A man is eating food.",  # duplicate
    "UPPER CASE SHOUTING TEXT",
    "tabs\tand\nnewlines\n\nhere",
    "x" * 300,
    " ".join(["word"] * 200),  # 200 tokens: near the 256 limit
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation "
    "ullamco laboris nisi ut aliquip ex ea commodo consequat.",
    *(f"Sentence {i} is about topic {i % 7} with {'more ' * (i % 11)}words." for i in range(30)),
]  # fmt: skip
LONG = " ".join(f"token{i}" for i in range(400))  # well over 256 tokens
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def model(minilm_path: Path) -> Iterator[Model]:
    with EmbeddingModelBuilder(minilm_path).with_model_id("minilm").build() as model:
        yield model


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_path), device="cpu")


def _reference(st: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(st.encode(texts, batch_size=16))


def _assert_close(got: list[list[float]], want: torch.Tensor) -> None:
    cosine = F.cosine_similarity(torch.tensor(got), want, dim=-1)
    worst = int(cosine.argmin())
    assert cosine.min() >= MIN_COSINE, f"input {worst}: cosine {cosine[worst]:.6f}"


def test_matches_sentence_transformers_over_a_varied_corpus(
    model: Model, reference: SentenceTransformer
) -> None:
    assert len(CORPUS) >= 50
    got = model.generate_embeddings(CORPUS)
    assert len(got) == len(CORPUS) and all(len(v) == 384 for v in got)
    _assert_close(got, _reference(reference, CORPUS))
    assert got[0] == got[25]  # duplicates embed identically, wherever they sit in the batch


def test_batching_equals_one_input_at_a_time(model: Model) -> None:
    texts = CORPUS[:12]
    together = torch.tensor(model.generate_embeddings(texts))
    alone = torch.tensor([model.generate_embedding(t) for t in texts])
    assert (together - alone).abs().max() <= 1e-5


def test_vectors_follow_the_model_config(model: Model) -> None:
    vector = torch.tensor(model.generate_embedding("normalized, as 2_Normalize says"))
    assert abs(float(vector.norm()) - 1.0) < 1e-5
    info = model.config()
    assert info.max_seq_len == 256  # sentence_bert_config.json, not the 512 positions
    assert info.architecture == "bert" and info.modalities["output"] == ["embeddings"]


def test_over_long_input_is_an_error_naming_it_unless_truncation_is_asked(
    model: Model, reference: SentenceTransformer
) -> None:
    with pytest.raises(ContextLengthError, match="input 1 has") as error:
        model.generate_embeddings(["short", LONG])
    assert error.value.param == "input[1]"
    request = EmbeddingRequestBuilder().add_prompt("short").add_prompt(LONG)
    got = model.generate_embeddings(request.with_truncate_sequence(True))
    _assert_close(got, _reference(reference, ["short", LONG]))  # it truncates to 256 too


def test_base64_requests_give_the_same_vectors(model: Model) -> None:
    texts = ["first sentence", "second one"]
    as_floats = model.generate_embeddings({"input": texts})
    as_base64 = model.generate_embeddings({"input": texts, "encoding_format": "base64"})
    assert torch.allclose(torch.tensor(as_base64), torch.tensor(as_floats), atol=1e-7)


def test_token_ids_embed_like_their_text(model: Model) -> None:
    ids = model.tokenize("A monkey is playing drums.")
    request = EmbeddingRequestBuilder().add_tokens(ids).add_prompts(["A monkey is playing drums."])
    by_ids, by_text = model.generate_embeddings(request)
    assert by_ids == by_text
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 30522\)"):
        model.generate_embeddings(EmbeddingRequestBuilder().add_tokens([5, 40000]))


def test_bad_requests_raise_naming_the_field(model: Model) -> None:
    with pytest.raises(InvalidRequestError) as error:
        model.generate_embeddings([])
    assert error.value.param == "input"
    with pytest.raises(InvalidRequestError, match="embedding model: it cannot chat"):
        model.chat("hello")
    with pytest.raises(InvalidRequestError) as error:
        model.send_embedding_request({"input": "hi", "dimensions": 500})
    assert error.value.param == "dimensions"


def test_async_model_gives_the_same_vectors(minilm_path: Path, model: Model) -> None:
    async def run() -> list[list[float]]:
        async with await EmbeddingModelBuilder(minilm_path).build_async() as amodel:
            return await asyncio.gather(*(amodel.generate_embedding(t) for t in CORPUS[:6]))

    got = asyncio.run(run())
    want = torch.tensor(model.generate_embeddings(CORPUS[:6]))
    assert (torch.tensor(got) - want).abs().max() <= 1e-5


def test_a_gguf_of_the_same_model_embeds_the_same(
    minilm_path: Path,
    minilm_gguf_vocab: dict[str, object],
    reference: SentenceTransformer,
    tmp_path: Path,
) -> None:
    """MiniLM written as llama.cpp writes a `bert` GGUF (vocabulary included) loads alone."""
    import json

    import numpy as np
    from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map
    from safetensors.torch import load_file

    config = json.loads((minilm_path / "config.json").read_text())
    names = get_tensor_name_map(MODEL_ARCH.BERT, config["num_hidden_layers"])
    path = tmp_path / "minilm.gguf"
    writer = GGUFWriter(path, "bert")
    for key, value in {
        "block_count": config["num_hidden_layers"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "pooling_type": 1,  # mean, as the model's 1_Pooling config says
    }.items():
        writer.add_uint32(f"bert.{key}", value)
    writer.add_float32("bert.attention.layer_norm_epsilon", config["layer_norm_eps"])
    for key, value in minilm_gguf_vocab.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, tensor in load_file(minilm_path / "model.safetensors").items():
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", tensor.float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    texts = CORPUS[:20]
    with EmbeddingModelBuilder(path).build() as model:
        got = torch.tensor(model.generate_embeddings(texts))
    want = torch.from_numpy(np.asarray(reference.encode(texts, convert_to_numpy=True)))
    assert F.cosine_similarity(got, want, dim=-1).min() >= MIN_COSINE
