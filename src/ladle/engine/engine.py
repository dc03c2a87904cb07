"""The step loop: requests in, tokens out, on one background thread that owns the model.

Every tensor operation on a model happens on its engine thread, so callers on any thread or
event loop only exchange plain Python objects through queues. A step is three calls, as in
nano-vllm: the scheduler picks the batch (continuous batching over the paged KV cache), the
model runner computes it, and each sequence that reached its last token samples the next.
`n` choices of one request are `n` sequences; the others start once the first has its
prompt in the cache, and share its blocks through the prefix cache.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ladle.engine.block_manager import BlockManager
from ladle.engine.kv_cache import DEFAULT_KV_CACHE_DTYPE, KERNEL_KV_DTYPES
from ladle.engine.loader import release_free_memory
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.model_runner import ModelRunner
from ladle.engine.models.base import CausalLM
from ladle.engine.sampling import SamplingParams
from ladle.engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig
from ladle.engine.sequence import Sequence, SequenceStatus, Sink, TokenEvent
from ladle.engine.step_compiler import StepCompiler
from ladle.errors import ContextLengthError, EngineClosedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_LONG_PREFILL = 64  # prompt tokens in one step whose activations are worth trimming after


@dataclass(slots=True)
class EngineConfig:
    max_seq_len: int
    dtype: torch.dtype = torch.float32
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # tokens per step; long prompts are prefilled in chunks
    kv_cache_tokens: int | None = None  # KV budget shared by all sequences (max_seq_len)
    # tokens a KV block holds: a prompt reuses a cached prefix in whole blocks, so it
    # recomputes up to block_size - 1 cached tokens before where it diverges (the serving
    # benchmark's cached prompt: 112 rows with 8, 120 with 16); larger blocks save only
    # bookkeeping
    block_size: int = 8
    # compile the step in the background (`step_compiler.py`); None: unless it runs on kernels
    compile: bool | None = False
    kv_cache_dtype: torch.dtype = DEFAULT_KV_CACHE_DTYPE  # what K/V are stored in (`kv_cache.py`)

    def __post_init__(self) -> None:
        tokens = self.kv_cache_tokens or self.max_seq_len
        self.kv_cache_tokens = -(-tokens // self.block_size) * self.block_size
        # one sequence must fit in the budget on its own, or it could never finish
        self.max_seq_len = min(self.max_seq_len, self.kv_cache_tokens)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics (read without a lock: counts may lag)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks: int
    preemptions: int
    compile_status: str  # "off", "compiling", "ready", "stale", "stopped" or "failed: ..."


class RequestHandle:
    """The sequences of one request; `abort` frees them at the next step."""

    def __init__(self, seqs: list[Sequence], prompt_ids: list[int], engine: LLMEngine) -> None:
        self.seqs = seqs
        self.prompt_ids = prompt_ids
        self._engine = engine

    def abort(self) -> None:
        self._engine.abort(self)


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        assert config.kv_cache_tokens is not None
        num_blocks = config.kv_cache_tokens // config.block_size
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks
        )
        cache = model.new_paged_cache(num_blocks, config.block_size, config.kv_cache_dtype)
        # the paged kernels take float32 queries over float32 or float16 pools
        cache.use_kernels = model.use_kernels and config.dtype == torch.float32
        cache.use_kernels &= config.kv_cache_dtype in KERNEL_KV_DTYPES
        self.runner = ModelRunner(model, cache)
        self.compiler: StepCompiler | None = None
        runs_on_kernels = config.dtype == torch.float32 and model.runs_on_kernels()
        if config.compile or (config.compile is None and not runs_on_kernels):
            self.compiler = StepCompiler(model, config.dtype)
        self._new: deque[RequestHandle] = deque()
        self._jobs: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._aborted: list[Sequence] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._scratch_to_release = False  # a long prefill ran since memory was last trimmed
        self.failure: str | None = None  # why the engine thread died, if it did
        # test-only: called with each batch before it runs; what it raises, the step raised
        self.fault_hook: Callable[[list[ScheduledSequence]], None] | None = None

    def serve(self) -> None:
        """Serve requests on the calling thread until `close`.

        The thread that loaded the model should be the one to call this (`ModelCore.start`
        arranges it): all of a model's torch work then happens on one thread.
        """
        self._thread = threading.current_thread()
        if self.compiler is not None:
            self.compiler.start()  # eager until the compiled step is ready
        try:
            self._loop()
        except BaseException as e:  # the thread dies: nobody may wait on it any longer
            logger.critical("the engine thread died", exc_info=e)
            self.failure = f"{type(e).__name__}: {e}"
            with self._cv:
                self._closed = True
            self._fail_all(EngineClosedError(f"the model's engine failed ({self.failure})"))

    # ------------------------------------------------------------ public, any thread

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        *,
        continues_prompt: bool = False,
    ) -> RequestHandle:
        """Queue a request of `params.n` choices; its events and errors go to `sink`.

        `continues_prompt` marks a text completion, whose first token may carry a leading
        space that only the prompt's last tokens let the decoder keep.
        """
        prompt_ids = self.fit_prompt(prompt_ids, params)
        room = self.config.max_seq_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        stop_ids = set(self.tokenizer.stop_token_ids) | set(params.stop_token_ids)
        seqs = [
            Sequence(
                i,
                prompt_ids,
                params,
                max_tokens,
                self.tokenizer,
                stop_ids,
                sink,
                continues_prompt,
            )
            for i in range(params.n)
        ]
        for seq in seqs[1:]:
            seq.parent = seqs[0]
        handle = RequestHandle(seqs, prompt_ids, self)
        with self._cv:
            if self._closed:
                raise EngineClosedError(self._closed_reason())
            self._new.append(handle)
            self._cv.notify()
        return handle

    def fit_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as it will run: checked against the context, or cut from the left."""
        limit = self.config.max_seq_len - 1  # leave room for at least one new token
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty", param="messages")
        if len(prompt_ids) <= limit:
            return prompt_ids
        if params.truncate_sequence:
            return prompt_ids[-limit:]
        raise ContextLengthError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
            f"{self.config.max_seq_len}; shorten it or set truncate_sequence",
            param="messages",
        )

    def stats(self) -> EngineStats:
        blocks = self.blocks
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + len(self._new),
            kv_blocks_used=blocks.num_blocks - blocks.num_free,
            kv_blocks=blocks.num_blocks,
            preemptions=self.scheduler.num_preemptions,
            compile_status="off" if self.compiler is None else self.compiler.status,
        )

    def run(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread (between steps), for direct model access."""
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError(self._closed_reason())
            self._jobs.append((future, fn))
            self._cv.notify()
        return future

    def _closed_reason(self) -> str:
        if self.failure is not None:
            return f"the model's engine failed ({self.failure}); load the model again"
        return "the model has been closed"

    def abort(self, handle: RequestHandle) -> None:
        with self._cv:
            self._aborted.extend(handle.seqs)
            self._cv.notify()

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.stop()
        with self._cv:
            self._closed = True
            self._cv.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            if self._scratch_to_release and not self._has_work():
                # after a long prefill: hand its 15-30 MB of freed activations back, which
                # would otherwise add to the process's peak as the KV pool fills
                release_free_memory()
                self._scratch_to_release = False
            with self._cv:
                while not (self._closed or self._has_work()):
                    self._cv.wait()
                if self._closed:
                    break
                jobs, self._jobs = list(self._jobs), deque()
                new, self._new = list(self._new), deque()
                aborted, self._aborted = self._aborted, []
            for handle in new:
                for seq in handle.seqs:
                    self.scheduler.add(seq)
            for seq in aborted:
                self.scheduler.finish(seq)  # its blocks are free for this very step
            for future, fn in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # handed to the caller, not swallowed
                        future.set_exception(e)
            batch = self.scheduler.schedule()
            if batch:
                self._step(batch)
        self._fail_all(EngineClosedError("the model was closed before the request finished"))

    def _has_work(self) -> bool:
        return bool(self._new or self._jobs or self.scheduler.has_work())

    def _step(self, batch: list[ScheduledSequence]) -> None:
        """Run the batch and sample; a failure ends only the request that caused it.

        Any exception is caught here because the engine thread must outlive a bad request:
        it is logged and handed to the request's caller, never swallowed. A batch that fails
        runs again one sequence at a time (its KV writes are redone, nothing was committed),
        so the others finish their step and only the failing one ends.
        """
        self._scratch_to_release |= any(item.num_tokens >= _LONG_PREFILL for item in batch)
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            rows = self.runner.run(batch)
        except Exception as e:
            if len(batch) > 1:
                logger.warning("a step of %d sequences failed (%r); one at a time", len(batch), e)
                for item in batch:
                    self._step([item])
                return
            logger.exception("a model step failed")
            self._fail(batch[0].seq, e)
            return
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            self.blocks.commit(item.seq)
        # the events go out once the whole step is sampled: handed over one by one, each woke
        # the server's event loop, whose thread then held the GIL while the rest were sampled
        outcomes: list[tuple[Sequence, TokenEvent | BaseException]] = []
        with torch.inference_mode():  # the rows are inference tensors, sampled in place
            for seq, row in rows.items():
                try:
                    outcomes.append((seq, seq.append_from_logits(row)))
                except Exception as e:
                    logger.exception("request failed")
                    self.scheduler.finish(seq)
                    outcomes.append((seq, e))
                    continue
                if seq.status is SequenceStatus.FINISHED:
                    self.scheduler.finish(seq)  # its KV blocks are free at once
        for seq, outcome in outcomes:
            if isinstance(outcome, BaseException):
                seq.sink.fail(outcome)
            else:
                seq.sink.put(outcome)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self.scheduler.finish(seq)
        seq.sink.fail(error)

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits (float32 `[vocab]`) of the token after `prompt_ids`; call through `run`.

        It runs outside the batch, on a cache of its own: nothing is sampled, nothing kept.
        """
        cache = self.model.new_cache(self.config.kv_cache_dtype)  # as the engine's own steps
        ids = torch.tensor(prompt_ids, dtype=torch.long)
        chunk = self.config.max_num_batched_tokens
        logits = torch.empty(0)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            positions = torch.arange(start, start + len(part))
            last = torch.tensor([len(part) - 1])
            logits = self.model(part, positions, cache, logits_indices=last)
        return logits[0]

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            pending = [s for h in self._new for s in h.seqs]
            pending += [*self.scheduler.waiting, *self.scheduler.running]
            self._new.clear()
            jobs, self._jobs = list(self._jobs), deque()
        for seq in pending:
            seq.sink.fail(error)
        for future, _ in jobs:
            future.set_exception(error)
