"""The worker an audio model runs on: its loading thread, running one call at a time, in order.

A voice or a Whisper model has no token-level batching to do, but its tensor work must stay on
the thread that loaded it (see `start_on_own_thread` in cores/text.py: torch's OpenMP pool
runs about 2x slower on another thread). Callers submit closures and wait on futures; a
stream of sentences is one submission per sentence, so two requests to one voice take turns
sentence by sentence rather than one waiting for the other's whole text.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ladle.errors import EngineClosedError

T = TypeVar("T")


class ModelWorker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._waiting: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Run submitted calls on the calling thread (the one that loaded the model)."""
        self._thread = threading.current_thread()
        while True:
            with self._cv:
                while not (self._closed or self._waiting):
                    self._cv.wait()
                if self._closed:
                    break
                fn, future = self._waiting.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away while it waited
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller; the worker goes on
                future.set_exception(e)
        self._fail_waiting()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError(f"the model {self.name!r} has been closed")
            self._waiting.append((fn, future))
            self._cv.notify()
        return future

    def run(self, fn: Callable[[], T]) -> T:
        """Submit and wait: for blocking callers."""
        return self.submit(fn).result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _fail_waiting(self) -> None:
        with self._cv:
            jobs = list(self._waiting)
            self._waiting.clear()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosedError(f"the model {self.name!r} was closed"))
