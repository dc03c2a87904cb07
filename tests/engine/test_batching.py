"""Continuous batching on the real SmolLM2: the paged cache, chunks, prefix hits and batches
compute what one sequence on its own computes.

Logits are compared with the contiguous single-sequence cache (`model.new_cache`) as the
reference, on SmolLM2's weights decoded to dense fp32: a chunk of a different length takes a
different attention kernel, whose last-bit differences the int4 layers (bf16 activations)
amplify to ~0.2 over 30 layers, while dense layers keep them at the fp16 output head's
rounding (measured 0.008): the tolerance is 2e-2 absolute on logits of magnitude ~20, and
the top token must agree. Greedy tokens in a batch equal those alone bit for bit on the int4
model: a sequence's rows take the same kernels either way.

The paged pools are checked in both KV cache dtypes, float32 and float16 (the engine's
default), each against a single-sequence cache that stores the same dtype: both then attend
the same rounded keys and values, and the tolerance above still holds.

On the native kernels attention computes every row alike whatever rows come with it, so there
a prompt's logits are compared bit for bit: cold, chunked, or after a prefix cache hit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ladle.engine.block_manager import BlockManager
from ladle.engine.engine import EngineConfig, LLMEngine
from ladle.engine.kernels import native
from ladle.engine.layers import linear
from ladle.engine.loader import LoadedModel, load_model
from ladle.engine.model_runner import ModelRunner
from ladle.engine.sampling import SamplingParams
from ladle.engine.scheduler import ScheduledSequence
from ladle.engine.sequence import TokenEvent

TOLERANCE = 2e-2
TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his "
    "father had, and lit the lamp that warned the fishing boats away from the rocks. In winter "
    "the storms came from the north and the glass rattled in its frame."
)


class Tokens:
    """The fields the runner reads from a sequence."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.block_table: list[int] = []
        self.contiguous = True
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> LoadedModel:
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def dense(smollm2_path: Path) -> LoadedModel:
    """SmolLM2 with every 4-bit layer decoded to fp32 instead of packed for the int4 kernel.

    The patch ends with the load (it matters only then): `smollm2`, loaded later in the module,
    must stay 4-bit, whose rows are computed alike in any batch.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear, "can_pack_int4", lambda weight: False)
        return load_model(smollm2_path)


@pytest.fixture(params=[torch.float32, torch.float16], ids=["f32", "f16"])
def kv_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The paged pools' dtype (and the reference cache's): a test taking it runs with both."""
    return request.param


@pytest.fixture(scope="module")
def prompt(smollm2: LoadedModel) -> list[int]:
    return smollm2.tokenizer.encode(TEXT)


def assert_same_logits(got: torch.Tensor | None, want: torch.Tensor) -> None:
    assert got is not None
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
    assert got.argmax() == want.argmax()


def reference_logits(
    loaded: LoadedModel, ids: list[int], kv_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits after the last token, from the contiguous single-sequence cache."""
    model = loaded.model
    with torch.inference_mode():
        cache = model.new_cache(kv_dtype)
        return model(
            torch.tensor(ids), torch.arange(len(ids)), cache, torch.tensor([len(ids) - 1])
        )[0]


def compute(
    runner: ModelRunner, blocks: BlockManager, seq: Tokens, chunk: int
) -> torch.Tensor | None:
    """Compute the rest of `seq` in chunks through the paged cache; the final logits."""
    row = None
    while seq.num_computed_tokens < seq.num_tokens:
        item = ScheduledSequence(seq, min(chunk, seq.num_tokens - seq.num_computed_tokens))  # type: ignore[arg-type]
        rows = runner.run([item])
        seq.num_computed_tokens += item.num_tokens
        blocks.commit(seq)  # type: ignore[arg-type]
        row = rows.get(seq)  # type: ignore[call-overload]
    return row


def paged(
    loaded: LoadedModel,
    num_blocks: int = 64,
    block_size: int = 16,
    kv_dtype: torch.dtype = torch.float32,
):
    cache = loaded.model.new_paged_cache(num_blocks, block_size, kv_dtype)
    assert cache.k[0].dtype == cache.v[-1].dtype == kv_dtype
    return ModelRunner(loaded.model, cache), BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_prefill_equals_one_shot(
    dense: LoadedModel, prompt: list[int], chunk: int, kv_dtype: torch.dtype
) -> None:
    runner, blocks = paged(dense, kv_dtype=kv_dtype)
    seq = Tokens(list(prompt))
    blocks.allocate(seq)  # type: ignore[arg-type]
    logits = compute(runner, blocks, seq, chunk)
    assert_same_logits(logits, reference_logits(dense, prompt, kv_dtype))


def test_prefix_cache_hit_equals_cold_run(
    dense: LoadedModel, prompt: list[int], kv_dtype: torch.dtype
) -> None:
    runner, blocks = paged(dense, kv_dtype=kv_dtype)
    first = Tokens(prompt[:40])
    blocks.allocate(first)  # type: ignore[arg-type]
    compute(runner, blocks, first, 512)
    first_blocks = first.block_table[:2]
    blocks.free(first)  # type: ignore[arg-type]
    second = Tokens(list(prompt))
    blocks.allocate(second)  # type: ignore[arg-type]
    assert second.num_cached_tokens == 32  # two full blocks of the first prompt
    assert second.block_table[:2] == first_blocks
    logits = compute(runner, blocks, second, 512)
    assert_same_logits(logits, reference_logits(dense, prompt, kv_dtype))


def test_scattered_blocks_equal_a_run(
    dense: LoadedModel, prompt: list[int], kv_dtype: torch.dtype
) -> None:
    """A table that is not one run (shared prefix, then own blocks) gathers its keys."""
    runner, blocks = paged(dense, kv_dtype=kv_dtype)
    seq = Tokens(list(prompt))
    needed = blocks.blocks_for(len(prompt))
    seq.block_table = [2 * (needed - i) for i in range(needed)]  # descending, with gaps
    seq.contiguous = False
    for b in seq.block_table:
        blocks._hold(b)
    logits = compute(runner, blocks, seq, 20)
    assert_same_logits(logits, reference_logits(dense, prompt, kv_dtype))


@pytest.mark.parametrize("contiguous", [True, False])
def test_kernel_decode_on_float16_pools_equals_one_sequence(
    dense: LoadedModel, prompt: list[int], contiguous: bool
) -> None:
    """Steps through the paged kernels (the decode kernel rounds new keys and values into
    the float16 pools itself) compute what the torch path computes on a float16 cache."""
    if not native.load():
        pytest.skip("native kernels unavailable")
    runner, blocks = paged(dense, kv_dtype=torch.float16)
    runner.cache.use_kernels = True
    seq = Tokens(list(prompt))
    if contiguous:
        blocks.allocate(seq)  # type: ignore[arg-type]
    else:
        seq.block_table = [8, 6, 4, 2]  # descending, with gaps: 64 slots for 49 tokens
        seq.contiguous = False
        for b in seq.block_table:
            blocks._hold(b)
    seq.token_ids = prompt[:40]  # a prefill, then 9 decode steps
    compute(runner, blocks, seq, 512)
    for token in prompt[40:49]:
        seq.token_ids.append(token)
        assert runner._kernel_step([ScheduledSequence(seq, 1)], slice(0, 1)) is not None  # type: ignore[arg-type]
        logits = compute(runner, blocks, seq, 1)
    assert_same_logits(logits, reference_logits(dense, prompt[:49], torch.float16))


@pytest.fixture
def kernels(smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 on the native kernels as the engine runs it once they load: its layers and
    one-off caches (a test turns on its paged cache's own `use_kernels`)."""
    if not native.load():
        pytest.skip("native kernels unavailable")
    monkeypatch.setattr(smollm2.model, "use_kernels", True)
    for module in smollm2.model.modules():
        if isinstance(module, linear.Linear):
            monkeypatch.setattr(module, "use_kernels", True)


def test_prefix_cache_hit_gives_the_cold_logits_bit_for_bit(
    smollm2: LoadedModel, kernels: None
) -> None:
    """On the kernels every row's attention is computed as if it were decoded alone, so a
    prompt's logits are the same bits cold, after a prefix cache hit on two thirds of it, in
    other chunks, and on a one-off cache (`LLMEngine.prompt_logits`)."""
    prompt = smollm2.tokenizer.encode(TEXT * 4)  # 196 tokens: two spans of the kernels

    def runner() -> tuple[ModelRunner, BlockManager]:
        runner, blocks = paged(smollm2, num_blocks=40, kv_dtype=torch.float16)
        runner.cache.use_kernels = True
        return runner, blocks

    def cold(chunk: int) -> torch.Tensor | None:
        run, blocks = runner()
        seq = Tokens(list(prompt))
        blocks.allocate(seq)  # type: ignore[arg-type]
        return compute(run, blocks, seq, chunk)

    run, blocks = runner()
    first = Tokens(prompt[: 2 * len(prompt) // 3])
    blocks.allocate(first)  # type: ignore[arg-type]
    compute(run, blocks, first, 512)
    blocks.free(first)  # type: ignore[arg-type]
    second = Tokens(list(prompt))
    blocks.allocate(second)  # type: ignore[arg-type]
    assert second.num_cached_tokens == 128  # 8 full blocks of the first 130 tokens
    hit = compute(run, blocks, second, 512)
    assert hit is not None
    assert torch.equal(hit, cold(512))
    assert torch.equal(hit, cold(50))
    assert torch.equal(hit, reference_logits(smollm2, prompt, torch.float16))


# ------------------------------------------------------------------ the engine, end to end


class Collect:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()

    def put(self, event: TokenEvent) -> None:
        self.events.put(event)

    def fail(self, error: BaseException) -> None:
        self.events.put(error)

    def tokens(self, n: int = 1) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(n)}
        done = 0
        while done < n:
            event = self.events.get(timeout=300)
            if isinstance(event, BaseException):
                raise event
            out[event.index].append(event.token_id)
            done += event.finish_reason is not None
        return out


@pytest.fixture
def engine_factory(smollm2: LoadedModel) -> Iterator:
    engines: list[LLMEngine] = []

    def start(loaded: LoadedModel = smollm2, **config: object) -> LLMEngine:
        engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(2048, **config))
        threading.Thread(target=engine.serve, daemon=True).start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close()


PROMPTS = [
    "Tell me about the sea.",
    "What is 2+2?",
    "Write a poem about cats.",
    "Explain gravity to a child.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "Describe a city at night.",
    "How do birds fly?",
]


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    """SmolLM2's chat format around one user message."""
    rendered = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return loaded.tokenizer.encode(rendered, add_special_tokens=False)


def alone_and_together(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's tokens run one at a time, then all submitted at once."""
    alone = []
    for ids in prompts:
        sink = Collect()
        engine.submit(ids, params, sink)
        alone.append(sink.tokens()[0])
    sinks = [Collect() for _ in prompts]
    for ids, sink in zip(prompts, sinks, strict=True):
        engine.submit(ids, params, sink)
    return alone, [sink.tokens()[0] for sink in sinks]


def test_batched_greedy_equals_single(
    smollm2: LoadedModel, engine_factory, kv_dtype: torch.dtype
) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [chat_ids(smollm2, p) for p in PROMPTS]
    engine = engine_factory(kv_cache_dtype=kv_dtype)
    assert engine.runner.cache.k[0].dtype == kv_dtype
    alone, together = alone_and_together(engine, prompts, params)
    assert together == alone


def test_batched_greedy_equals_single_through_the_paged_kernel(
    smollm2: LoadedModel, engine_factory
) -> None:
    """The engine's default float16 pools, decoded by the native kernel."""
    if not native.load():
        pytest.skip("native kernels unavailable")
    engine = engine_factory()
    assert engine.runner.cache.k[0].dtype == torch.float16  # the default
    engine.run(lambda: setattr(engine.runner.cache, "use_kernels", True)).result()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [chat_ids(smollm2, p) for p in PROMPTS[:4]]
    alone, together = alone_and_together(engine, prompts, params)
    assert together == alone


def test_preempted_requests_finish_with_the_same_tokens(dense: LoadedModel, engine_factory) -> None:
    """A KV budget too small for three requests at once: they take turns, none is lost.

    A preempted sequence is recomputed in chunks of other lengths than it first ran, so this
    runs on dense weights (see the module docstring) for its greedy tokens to be stable.
    """
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [chat_ids(dense, p) for p in PROMPTS[:3]]
    roomy = engine_factory(dense)
    alone = []
    for ids in prompts:
        sink = Collect()
        roomy.submit(ids, params, sink)
        alone.append(sink.tokens()[0])
    tight = engine_factory(dense, kv_cache_tokens=96, block_size=8)
    sinks = [Collect() for _ in prompts]
    for ids, sink in zip(prompts, sinks, strict=True):
        tight.submit(ids, params, sink)
    assert [sink.tokens()[0] for sink in sinks] == alone
    assert tight.scheduler.num_preemptions > 0


def test_n_choices_share_the_prompt_blocks(smollm2: LoadedModel, engine_factory) -> None:
    engine = engine_factory()
    ids = chat_ids(smollm2, PROMPTS[0])
    sink = Collect()
    engine.submit(ids, SamplingParams(max_tokens=8, n=3, temperature=0.8, seed=1), sink)
    choices = sink.tokens(3)
    assert all(len(tokens) == 8 for tokens in choices.values())
    # the second and third choices found the first one's full prompt blocks in the cache
    assert engine.run(lambda: len(engine.blocks.hash_to_block)).result() >= len(ids) // 16


def test_abort_frees_every_block_at_once(smollm2: LoadedModel, engine_factory) -> None:
    engine = engine_factory()
    sink = Collect()
    handle = engine.submit(chat_ids(smollm2, PROMPTS[3]), SamplingParams(max_tokens=500), sink)
    sink.events.get(timeout=60)  # it is decoding
    handle.abort()
    assert engine.run(lambda: engine.blocks.num_free).result() == engine.blocks.num_blocks
    assert engine.run(lambda: engine.scheduler.has_work()).result() is False
