"""The compiled step computes what the eager model computes, and steps aside when weights change.

A four-layer cut of SmolLM2 (its real int4 layers, fp16 head and tokenizer) keeps compiling
to seconds; the graphs are the same per layer as the whole model's. Compiled and eager logits
differ only by fused float rounding (and, with the native kernels, by their fp32 head and
attention): the tolerance is 1% of the logits' spread, and the greedy tokens must agree.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_batching import PROMPTS, alone_and_together, chat_ids
from torch import nn

from ladle.engine.engine import EngineConfig, LLMEngine
from ladle.engine.layers.linear import Linear
from ladle.engine.loader import LoadedModel, load_model
from ladle.engine.models.base import CausalLM
from ladle.engine.sampling import SamplingParams
from ladle.engine.step_compiler import CompiledStep, StepCompiler

NUM_LAYERS = 4
COMPILE_TIMEOUT = 600


@pytest.fixture(scope="module")
def small(smollm2_path: Path) -> LoadedModel:
    """SmolLM2 cut to its first layers: real weights, quick to compile."""
    loaded = load_model(smollm2_path)
    model = loaded.model
    model.model.layers = nn.ModuleList(model.model.layers[:NUM_LAYERS])
    types = model.config.layer_types
    model.config = dataclasses.replace(
        model.config,
        num_hidden_layers=NUM_LAYERS,
        layer_types=types[:NUM_LAYERS] if types is not None else None,
    )
    return dataclasses.replace(loaded, config=model.config)


@pytest.fixture(scope="module")
def compiled(small: LoadedModel) -> Iterator[StepCompiler]:
    compiler = StepCompiler(small.model, small.dtype)
    compiler.start()
    assert compiler.wait(COMPILE_TIMEOUT), compiler.status
    yield compiler
    small.model.step = None


@torch.inference_mode()
def greedy(model: CausalLM, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prompt's last token and of `steps` greedy decode steps, and the tokens."""
    cache = model.new_cache(torch.float32)
    ids, rows, tokens = torch.tensor(prompt), [], []
    last = torch.tensor([len(prompt) - 1])
    rows.append(model(ids, torch.arange(len(prompt)), cache, last)[0])
    for step in range(steps):
        tokens.append(int(rows[-1].argmax()))
        position = torch.tensor([len(prompt) + step])
        rows.append(model(torch.tensor(tokens[-1:]), position, cache, torch.tensor([0]))[0])
    return rows, tokens


def ran_compiled(fn) -> bool:
    """Whether `fn()` went through a compiled graph (the profiler names compiled regions)."""
    with torch.profiler.profile() as prof:
        fn()
    return any("Torch-Compiled Region" in event.name for event in prof.events())


def test_compiled_step_matches_eager(small: LoadedModel, compiled: StepCompiler) -> None:
    model, prompt = small.model, chat_ids(small, PROMPTS[0])
    step = model.step
    assert isinstance(step, CompiledStep)
    model.step = None
    eager_rows, eager_tokens = greedy(model, prompt, 16)
    model.step = step
    rows, tokens = [], []
    assert ran_compiled(lambda: rows.extend(greedy(model, prompt, 16)[0]))
    tokens = [int(row.argmax()) for row in rows[:-1]]
    assert tokens == eager_tokens
    for row, eager in zip(rows, eager_rows, strict=True):
        spread = float(eager.max() - eager.min())
        assert float((row - eager).abs().max()) < 0.01 * spread


def test_a_chunk_of_many_tokens_and_rows_runs_compiled(
    small: LoadedModel, compiled: StepCompiler
) -> None:
    """The dynamic graphs cover sizes never seen while warming up."""
    model = small.model
    ids = torch.tensor(chat_ids(small, PROMPTS[1]) * 3)  # not inference tensors: copied in
    rows = torch.tensor([0, 7, len(ids) - 1])
    with torch.inference_mode():
        out: list[torch.Tensor] = []

        def run() -> None:
            out.append(model(ids, torch.arange(len(ids)), model.new_cache(torch.float32), rows))

        assert ran_compiled(run)
        step, model.step = model.step, None
        eager = model(ids, torch.arange(len(ids)), model.new_cache(torch.float32), rows)
        model.step = step
    assert out[0].shape == (3, small.config.vocab_size)
    assert torch.equal(out[0].argmax(-1), eager.argmax(-1))


def test_a_chunk_without_logits_rows_runs_compiled(
    small: LoadedModel, compiled: StepCompiler
) -> None:
    """A prompt chunk that completes no sequence (the first chunks of a long prompt) has no
    graph of its own: it takes the one-row graph and drops the row, rather than run eagerly
    (and round differently from the chunks around it)."""
    model = small.model
    ids = torch.tensor(chat_ids(small, PROMPTS[1]) * 2)
    none = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        out: list[torch.Tensor] = []
        cache = model.new_cache(torch.float32)
        assert ran_compiled(lambda: out.append(model(ids, torch.arange(len(ids)), cache, none)))
    assert out[0].shape == (0, small.config.vocab_size)
    assert cache.length == len(ids)  # every token's keys and values are in


def test_changed_weights_run_eagerly_then_compile_again(
    small: LoadedModel, compiled: StepCompiler
) -> None:
    model = small.model
    prompt = chat_ids(small, PROMPTS[2])
    before, _ = greedy(model, prompt, 0)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear)
    original = Linear(layer.in_features, layer.out_features)
    original.take_weights(layer)
    scaled = Linear(layer.in_features, layer.out_features)
    scaled.load_weight(layer.dequantized() * 0.5, torch.float32)
    layer.take_weights(scaled)  # what re-ISQ does to every layer
    try:
        changed: list[torch.Tensor] = []
        assert not ran_compiled(lambda: changed.extend(greedy(model, prompt, 0)[0]))
        assert not torch.allclose(changed[0], before[0], atol=1e-3)  # the new weight is used
        assert compiled.wait(COMPILE_TIMEOUT), compiled.status  # compiled again, in the back
        again: list[torch.Tensor] = []
        assert ran_compiled(lambda: again.extend(greedy(model, prompt, 0)[0]))
        spread = float(changed[0].max() - changed[0].min())
        assert float((again[0] - changed[0]).abs().max()) < 0.01 * spread
    finally:
        layer.take_weights(original)
        assert compiled.wait(COMPILE_TIMEOUT) or compiled.status == "compiling"


@pytest.fixture
def compiled_engine(small: LoadedModel) -> Iterator[LLMEngine]:
    step, small.model.step = small.model.step, None
    engine = LLMEngine(small.model, small.tokenizer, EngineConfig(1024, compile=True))
    threading.Thread(target=engine.serve, daemon=True).start()
    assert engine.compiler is not None
    assert engine.compiler.wait(COMPILE_TIMEOUT), engine.compiler.status
    yield engine
    engine.close()
    small.model.step = step


def test_compiled_engine_batched_greedy_equals_single(
    small: LoadedModel, compiled_engine: LLMEngine
) -> None:
    assert compiled_engine.stats().compile_status == "ready"
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [chat_ids(small, p) for p in PROMPTS]
    alone, together = alone_and_together(compiled_engine, prompts, params)
    assert together == alone
    stats = compiled_engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)


def test_closing_the_engine_stops_its_compile(small: LoadedModel) -> None:
    step, small.model.step = small.model.step, None
    engine = LLMEngine(small.model, small.tokenizer, EngineConfig(1024, compile=True))
    thread = threading.Thread(target=engine.serve, daemon=True)
    thread.start()
    try:
        engine.close()
        assert engine.compiler is not None
        assert not engine.compiler.wait(COMPILE_TIMEOUT)
        assert engine.compiler.status == "stopped"
        assert small.model.step is None  # nothing installed on a closed model
    finally:
        small.model.step = step
