"""The step loop: requests in, tokens out, on one background thread that owns the model.

Every tensor operation on a model happens on its engine thread, so callers on any thread or
event loop only exchange plain Python objects through queues. A step prefills the requests
that arrived (long prompts in chunks), then decodes one token for every running sequence.
`n` choices share one prefill: their KV caches are forks of the first one.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ladle.engine.kv_cache import KVCache
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.models.base import CausalLM
from ladle.engine.sampling import SamplingParams
from ladle.engine.sequence import Sequence, SequenceStatus, Sink
from ladle.errors import ContextLengthError, EngineClosedError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class EngineConfig:
    max_seq_len: int
    dtype: torch.dtype = torch.float32
    max_num_seqs: int = 16
    prefill_chunk_size: int = 512  # bounds attention memory on long prompts


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
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[Sequence] = []
        self._jobs: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._aborted: set[int] = set()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Serve requests on the calling thread until `close`.

        The thread that loaded the model should be the one to call this (`ModelCore.start`
        arranges it): all of a model's torch work then happens on one thread.
        """
        self._thread = threading.current_thread()
        self._loop()

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
        handle = RequestHandle(seqs, prompt_ids, self)
        with self._cv:
            if self._closed:
                raise EngineClosedError("the model has been closed")
            self._waiting.append(handle)
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

    def run(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread (between steps), for direct model access."""
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError("the model has been closed")
            self._jobs.append((future, fn))
            self._cv.notify()
        return future

    def abort(self, handle: RequestHandle) -> None:
        with self._cv:
            self._aborted.update(s.seq_id for s in handle.seqs)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self._running or self._jobs):
                    self._cv.wait()
                if self._closed:
                    break
                jobs, self._jobs = list(self._jobs), deque()
                aborted, self._aborted = self._aborted, set()
                room = self.config.max_num_seqs - len(self._running)
                new: list[RequestHandle] = []
                while self._waiting and room >= len(self._waiting[0].seqs):
                    room -= len(self._waiting[0].seqs)
                    new.append(self._waiting.popleft())
            for future, fn in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # handed to the caller, not swallowed
                        future.set_exception(e)
            self._running = [s for s in self._running if s.seq_id not in aborted]
            for handle in new:
                if all(s.seq_id not in aborted for s in handle.seqs):
                    self._guarded(handle.seqs, functools.partial(self._prefill, handle))
            for seq in list(self._running):
                self._guarded([seq], functools.partial(self._decode, seq))
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]
        self._fail_all(EngineClosedError("the model was closed before the request finished"))

    def _guarded(self, seqs: list[Sequence], step: Callable[[], Any]) -> None:
        """Run a step; a failure ends only the sequences it touched, with the error.

        Any exception is caught here because the engine thread must outlive a bad request:
        it is logged and handed to the request's caller, never swallowed.
        """
        try:
            step()
        except Exception as e:
            logger.exception("request failed")
            for s in seqs:
                s.status = SequenceStatus.FINISHED
                if s in self._running:
                    self._running.remove(s)
                s.sink.fail(e)

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits (float32 `[vocab]`) of the token after `prompt_ids`; call through `run`."""
        return self._prefill_prompt(prompt_ids)[1]

    @torch.inference_mode()
    def _prefill_prompt(self, prompt_ids: list[int]) -> tuple[KVCache, torch.Tensor]:
        """A new cache holding the prompt, and the logits after its last token."""
        cache = self.model.new_cache(self.config.dtype)
        ids = torch.tensor(prompt_ids, dtype=torch.long)
        chunk = self.config.prefill_chunk_size
        logits = None
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            positions = torch.arange(start, start + len(part))
            last = torch.tensor([len(part) - 1])
            logits = self.model(part, positions, cache, logits_indices=last)
        assert logits is not None
        return cache, logits[0]

    def _prefill(self, handle: RequestHandle) -> None:
        cache, row = self._prefill_prompt(handle.prompt_ids)
        for i, seq in enumerate(handle.seqs):
            seq.cache = cache if i == 0 else cache.fork()
            seq.status = SequenceStatus.RUNNING
        for seq in handle.seqs:
            seq.append_from_logits(row)
            if seq.status is SequenceStatus.RUNNING:
                self._running.append(seq)

    @torch.inference_mode()
    def _decode(self, seq: Sequence) -> None:
        assert seq.cache is not None
        ids = torch.tensor([seq.last_token_id], dtype=torch.long)
        positions = torch.tensor([seq.num_tokens - 1])
        logits = self.model(ids, positions, seq.cache)
        seq.append_from_logits(logits[-1])
        if seq.status is SequenceStatus.FINISHED:
            seq.cache = None  # free the KV memory at once

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            pending = [s for h in self._waiting for s in h.seqs] + self._running
            self._waiting.clear()
            self._running = []
            jobs, self._jobs = list(self._jobs), deque()
        for seq in pending:
            seq.sink.fail(error)
        for future, _ in jobs:
            future.set_exception(error)
