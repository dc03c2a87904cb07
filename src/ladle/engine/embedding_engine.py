"""The worker an embedding model runs on: one thread, a queue, batches of whatever waits.

An embedding request is one forward pass, with no tokens to stream, so it skips the chat
engine's step loop; but its tensor work still stays on the thread that loaded the model
(see `ModelCore.start`: torch's OpenMP kernels run about 2x slower on another thread). Every
request waiting when the worker wakes is embedded in the same batches, so concurrent callers
(the HTTP service's clients) share forwards.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

import torch

from ladle.engine.embedder import Embedder
from ladle.errors import EngineClosedError


class EmbeddingEngine:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._waiting: deque[tuple[list[list[int]], Future[torch.Tensor]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Embed queued requests on the calling thread (the one that loaded the model)."""
        self._thread = threading.current_thread()
        while True:
            with self._cv:
                while not (self._closed or self._waiting):
                    self._cv.wait()
                if self._closed:
                    break
                jobs = list(self._waiting)
                self._waiting.clear()
            self._run(jobs)
        self._fail_waiting()

    def submit(self, inputs: list[list[int]]) -> Future[torch.Tensor]:
        """Queue token id lists; the future gives their vectors `[len(inputs), dim]` in order."""
        future: Future[torch.Tensor] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError("the model has been closed")
            self._waiting.append((inputs, future))
            self._cv.notify()
        return future

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, jobs: list[tuple[list[list[int]], Future[torch.Tensor]]]) -> None:
        inputs = [ids for job_inputs, _ in jobs for ids in job_inputs]
        try:
            vectors = self.embedder.embed(inputs)
        except Exception as e:  # handed to every caller of this batch; the worker goes on
            for _, future in jobs:
                future.set_exception(e)
            return
        start = 0
        for job_inputs, future in jobs:
            future.set_result(vectors[start : start + len(job_inputs)])
            start += len(job_inputs)

    def _fail_waiting(self) -> None:
        with self._cv:
            jobs = list(self._waiting)
            self._waiting.clear()
        for _, future in jobs:
            future.set_exception(EngineClosedError("the model was closed before embedding"))
