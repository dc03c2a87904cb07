"""Several models behind one `Model` (mistral.rs's multi-model calls): routing by `model_id`,
the default model, adding and removing models while serving, and failed builds that leave
no engine running."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ladle import (
    EmbeddingModelBuilder,
    EngineClosedError,
    GgufModelBuilder,
    InvalidRequestError,
    Model,
    ModelLoadError,
    ModelNotFoundError,
    MultiModelBuilder,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(max_tokens: int = 8) -> dict[str, object]:
    return {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}


def _engines() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("ladle-")}


@pytest.fixture(scope="module")
def models(smollm2_path: Path, minilm_path: Path) -> Iterator[Model]:
    gguf = GgufModelBuilder(smollm2_path.parent, smollm2_path.name)
    m = (
        MultiModelBuilder()
        .add_model(gguf, alias="first")
        .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="second")
        .add_model(EmbeddingModelBuilder(str(minilm_path)), alias="embed")
        .build()
    )
    yield m
    m.close()


def test_each_model_answers_under_its_own_id(models: Model) -> None:
    assert models.list_models() == ["first", "second", "embed"]
    assert models.get_default_model_id() == "first"
    first = models.send_chat_request(_greedy())
    second = models.send_chat_request(_greedy(), model_id="second")
    assert (first.model, second.model) == ("first", "second")
    # the same weights, greedy: the same reply from either engine
    assert first.choices[0].message.content == second.choices[0].message.content
    vector = models.generate_embedding("Paris is in France.", model_id="embed")
    assert len(vector) == 384  # all-MiniLM-L6-v2's width
    info = models.config("embed")
    assert (info.model_id, info.architecture) == ("embed", "bert")
    assert models.config().model_id == "first"
    assert models.max_sequence_length("embed") == 256


def test_a_stream_and_the_token_calls_take_model_id(models: Model) -> None:
    chunks = list(models.stream_chat_request(_greedy(4), model_id="second"))
    assert {c.model for c in chunks} == {"second"}
    ids = models.tokenize("Hello there", model_id="embed")
    assert models.detokenize(ids, skip_special_tokens=True, model_id="embed") == "hello there"
    assert models.tokenize("Hello there") != ids  # the default model's own tokenizer


def test_a_model_asked_for_what_it_cannot_do_or_an_unknown_id_is_named(models: Model) -> None:
    with pytest.raises(InvalidRequestError, match="'embed' is an embedding model"):
        models.chat("Hi", model_id="embed")
    with pytest.raises(InvalidRequestError, match="'first' is a text model: it cannot give emb"):
        models.generate_embedding("Hi")
    with pytest.raises(ModelNotFoundError, match=r"'third'.*embed.*first.*second"):
        models.chat("Hi", model_id="third")
    with pytest.raises(ModelNotFoundError, match="'third'"):
        models.set_default_model_id("third")


def test_the_default_moves_and_a_removed_model_stops_its_requests(smollm2_path: Path) -> None:
    before = _engines()
    m = (
        MultiModelBuilder()
        .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="a")
        .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="b")
        .with_default_model("b")
        .build()
    )
    try:
        assert m.get_default_model_id() == "b"
        assert m.send_chat_request(_greedy(2)).model == "b"
        m.set_default_model_id("a")
        assert m.send_chat_request(_greedy(2)).model == "a"
        running = m.stream_chat_request(_greedy(500), model_id="a")
        next(running)
        m.remove_model("a")  # the default: the first model left takes over
        with pytest.raises(EngineClosedError):
            list(running)
        assert m.list_models() == ["b"]
        assert m.get_default_model_id() == "b"
        assert "ladle-engine[a]" not in _engines()
        with pytest.raises(ModelNotFoundError, match="'a'"):
            m.chat("Hi", model_id="a")
        with pytest.raises(InvalidRequestError, match="only model"):
            m.remove_model("b")
        assert m.send_chat_request(_greedy(2)).model == "b"
    finally:
        m.close()
    assert _engines() == before


def test_models_added_while_serving_and_a_taken_id_refused(smollm2_path: Path) -> None:
    before = _engines()
    m = GgufModelBuilder(smollm2_path.parent, smollm2_path.name).with_model_id("base").build()
    try:
        added = m.add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), "extra")
        assert added == "extra"
        assert m.list_models() == ["base", "extra"]
        assert m.send_chat_request(_greedy(2), model_id="extra").model == "extra"
        with pytest.raises(InvalidRequestError, match="'extra' is already loaded"):
            m.add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), "extra")
        assert m.list_models() == ["base", "extra"]
        assert sorted(_engines() - before) == ["ladle-engine[base]", "ladle-engine[extra]"]
    finally:
        m.close()
    assert _engines() == before


def test_a_failed_build_closes_the_models_it_loaded(smollm2_path: Path, tmp_path: Path) -> None:
    before = _engines()
    loads_then_fails = MultiModelBuilder().add_model(
        GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="ok"
    )
    loads_then_fails.add_model(GgufModelBuilder(tmp_path / "missing.gguf"), alias="missing")
    with pytest.raises(ModelLoadError, match=r"missing\.gguf"):
        loads_then_fails.build()
    assert _engines() == before
    unknown_default = (
        MultiModelBuilder()
        .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="ok")
        .with_default_model("nope")
    )
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        unknown_default.build()
    assert _engines() == before
    with pytest.raises(InvalidRequestError, match="no models"):
        MultiModelBuilder().build()


def test_the_async_model_routes_adds_and_removes_alike(smollm2_path: Path) -> None:
    async def main() -> None:
        m = await (
            MultiModelBuilder()
            .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="x")
            .build_async()
        )
        try:
            await m.add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), "y")
            x, y = await asyncio.gather(
                m.send_chat_request(_greedy()), m.send_chat_request(_greedy(), model_id="y")
            )
            assert (x.model, y.model) == ("x", "y")
            assert x.choices[0].message.content == y.choices[0].message.content
            chunks = [c async for c in m.stream_chat_request(_greedy(3), model_id="y")]
            assert {c.model for c in chunks} == {"y"}
            await m.remove_model("x")
            assert m.list_models() == ["y"]
            assert m.get_default_model_id() == "y"
        finally:
            await m.aclose()

    before = _engines()
    asyncio.run(main())
    assert _engines() == before


def test_an_unloaded_model_keeps_its_id_and_loads_again(smollm2_path: Path) -> None:
    before = _engines()
    m = GgufModelBuilder(smollm2_path.parent, smollm2_path.name).with_model_id("solo").build()
    try:
        reply = m.send_chat_request(_greedy()).choices[0].message.content
        m.unload_model("solo")
        assert "ladle-engine[solo]" not in _engines()
        assert not m.is_model_loaded("solo")
        assert m.list_models_with_status() == [("solo", "unloaded")]
        with pytest.raises(InvalidRequestError, match=r"unloaded: reload_model\('solo'\)"):
            m.chat("Hi")
        with pytest.raises(InvalidRequestError, match="already unloaded"):
            m.unload_model("solo")
        m.reload_model("solo")
        m.reload_model("solo")  # loaded already: left as it is
        assert m.list_models_with_status() == [("solo", "loaded")]
        assert m.send_chat_request(_greedy()).choices[0].message.content == reply
        assert not m.is_model_loaded("other")
    finally:
        m.close()
    assert _engines() == before


def test_the_async_model_unloads_and_reloads_too(smollm2_path: Path) -> None:
    async def main() -> None:
        m = await (
            MultiModelBuilder()
            .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="p")
            .add_model(GgufModelBuilder(smollm2_path.parent, smollm2_path.name), alias="q")
            .build_async()
        )
        try:
            await m.unload_model("q")
            assert m.list_models_with_status() == [("p", "loaded"), ("q", "unloaded")]
            assert (await m.send_chat_request(_greedy(2))).model == "p"
            await m.reload_model("q")
            assert (await m.send_chat_request(_greedy(2), model_id="q")).model == "q"
            await m.unload_model("q")
            await m.remove_model("q")  # an unloaded model has no engine left to stop
            assert m.list_models() == ["p"]
        finally:
            await m.aclose()

    before = _engines()
    asyncio.run(main())
    assert _engines() == before
