"""The engine's settings as a user sets them: a KV budget and dtype, sequences per step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ladle import GgufModelBuilder
from ladle.cli import main
from ladle.cli import serve as serve_cli
from ladle.engine.engine import EngineConfig, LLMEngine
from ladle.errors import ContextLengthError, InvalidRequestError
from ladle.model import Model
from ladle.server.app import ServerSettings


def kv_pools(model: Model) -> list[torch.Tensor]:
    """The engine's paged KV pools, keys and values of every layer."""
    cache = model._core.engine.runner.cache
    return [*cache.k, *cache.v]


def test_a_kv_budget_caps_the_context_and_still_serves(smollm2_path: Path) -> None:
    with GgufModelBuilder(smollm2_path).with_kv_cache_tokens(203).build() as model:
        assert model.max_sequence_length() == 208  # rounded up to whole 8-token blocks
        assert {pool.dtype for pool in kv_pools(model)} == {torch.float16}  # the default
        reply = model.send_completion_request({"prompt": "word " * 190, "max_tokens": 400})
        usage = reply.usage
        assert usage.prompt_tokens + usage.completion_tokens == 208  # not 590
        assert reply.choices[0].finish_reason == "length"
        with pytest.raises(ContextLengthError):
            model.send_completion_request({"prompt": "word " * 300, "max_tokens": 1})


def test_a_float32_kv_cache_stays_selectable(smollm2_path: Path) -> None:
    builder = GgufModelBuilder(smollm2_path).with_kv_cache_tokens(64).with_kv_cache_dtype("f32")
    with builder.build() as model:
        assert {pool.dtype for pool in kv_pools(model)} == {torch.float32}
        # 64 tokens, 3 kv heads of 64 dims: 48 KiB per pool in float32 (24 in float16)
        assert kv_pools(model)[0].nbytes == 64 * 3 * 64 * 4
        reply = model.send_completion_request({"prompt": "One, two,", "max_tokens": 4})
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert model.logits_for(model.tokenize("One, two, three")).shape[-1] == 49152


@pytest.mark.parametrize(
    ("field", "value"),
    [("kv_cache_tokens", 1), ("max_num_seqs", 0), ("num_threads", 0), ("kv_cache_dtype", "q8")],
)
def test_bad_engine_limits_name_the_setting(field: str, value: int | str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        ServerSettings(**{field: value})  # type: ignore[arg-type]
    assert caught.value.param == field


def test_builder_rejects_a_tiny_kv_budget(smollm2_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        GgufModelBuilder(smollm2_path).with_kv_cache_tokens(1)
    assert caught.value.param == "kv_cache_tokens"


@pytest.mark.parametrize("value", ["int8", torch.bfloat16])
def test_builder_rejects_an_unknown_kv_cache_dtype(smollm2_path: Path, value: object) -> None:
    with pytest.raises(InvalidRequestError, match="f16, float16, f32, float32") as caught:
        GgufModelBuilder(smollm2_path).with_kv_cache_dtype(value)  # type: ignore[arg-type]
    assert caught.value.param == "kv_cache_dtype"


@pytest.mark.parametrize(("argv", "expected"), [([], "f16"), (["--kv-cache-dtype", "f32"], "f32")])
def test_serve_passes_the_kv_cache_dtype_on(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: str
) -> None:
    settings: list[ServerSettings] = []

    @contextlib.contextmanager
    def registration(*args: object) -> Iterator[Callable[[str], None]]:
        yield lambda url: None

    monkeypatch.setattr("ladle.manager.service.registration", registration)
    monkeypatch.setattr(serve_cli, "serve", lambda s, on_ready: settings.append(s))
    monkeypatch.setattr("signal.signal", lambda *args: None)  # leave pytest's SIGTERM be
    assert main(["serve", *argv]) == 0
    assert [s.kv_cache_dtype for s in settings] == [expected]


def test_a_model_on_the_native_layer_kernels_does_not_compile_by_default(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LADLE_COMPILE` unset (auto): SmolLM2's layers all run on the native layer ops, so no
    compile starts; the same model computing in bfloat16, which those ops do not take, would
    compile."""
    monkeypatch.delenv("LADLE_COMPILE")
    with GgufModelBuilder(smollm2_path).build() as model:
        engine = model._core.engine
        if not engine.model.use_kernels:
            pytest.skip("native kernels unavailable")
        assert engine.model.runs_on_kernels()
        assert engine.compiler is None
        assert model.engine_stats().compile_status == "off"
        assert model.wait_until_compiled(0) is False
        bf16 = LLMEngine(
            engine.model, engine.tokenizer, EngineConfig(64, torch.bfloat16, compile=None)
        )
        assert bf16.compiler is not None  # built, not started: the engine never served
        bf16.close()
