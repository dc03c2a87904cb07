"""Faults stay where they happen: a request whose step fails ends alone while the others in
its batch go on; an engine thread that dies fails every waiter at once, refuses new work, and
says why; the service reports it on `/health` and loads the model afresh for the next request.

Faults are injected through the engine's test-only `fault_hook`, called with each batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from ladle import EngineClosedError, Model, TextModelBuilder
from ladle.engine.engine import LLMEngine
from ladle.engine.scheduler import ScheduledSequence

pytestmark = pytest.mark.real_model

GREEDY = {"max_tokens": 24, "temperature": 0}
HEALTHY = {"messages": [{"role": "user", "content": "Name three colours."}], **GREEDY}
POISONED = {"messages": [{"role": "user", "content": "Say zebra zebra."}], **GREEDY}


class EngineDeath(BaseException):
    """Not an `Exception`: nothing in the step catches it, so the engine thread dies."""


def _engine(model: Model) -> LLMEngine:
    return model._models.text(None).engine


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_a_failing_request_ends_alone_and_its_batch_goes_on(smollm2_path: Path) -> None:
    with TextModelBuilder(smollm2_path).build() as model:
        alone = model.send_chat_request(HEALTHY).choices[0].message.content
        marker = model.tokenize(" zebra zebra", add_special_tokens=False)
        shared_batches = 0

        def hook(batch: list[ScheduledSequence]) -> None:
            nonlocal shared_batches
            poisoned = [b for b in batch if _contains(b.seq.prompt_ids, marker)]
            decoding = [b for b in poisoned if b.seq.num_computed_tokens >= len(b.seq.prompt_ids)]
            if decoding:
                shared_batches += len(batch) > 1
                raise RuntimeError("injected fault")

        _engine(model).fault_hook = hook
        results: dict[str, Any] = {}

        def ask(name: str, request: dict[str, Any]) -> None:
            try:
                results[name] = model.send_chat_request(request).choices[0].message.content
            except Exception as e:  # the poisoned one's, checked below
                results[name] = e

        threads = [
            threading.Thread(target=ask, args=(name, request))
            for name, request in (("poisoned", POISONED), ("healthy", HEALTHY))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results["poisoned"], RuntimeError)
        assert str(results["poisoned"]) == "injected fault"
        assert results["healthy"] == alone  # its step ran again alone, and greedily the same
        assert shared_batches >= 1  # the fault hit a batch the two shared
        _engine(model).fault_hook = None
        assert model.send_chat_request(HEALTHY).choices[0].message.content == alone


def test_a_dead_engine_fails_its_waiters_and_refuses_new_work(smollm2_path: Path) -> None:
    with TextModelBuilder(smollm2_path).build() as model:

        def hook(batch: list[ScheduledSequence]) -> None:
            raise EngineDeath("the engine thread was killed")

        _engine(model).fault_hook = hook
        with pytest.raises(EngineClosedError, match="EngineDeath: the engine thread was killed"):
            model.send_chat_request(HEALTHY)
        assert model.engine_failure() == "EngineDeath: the engine thread was killed"
        with pytest.raises(EngineClosedError, match="load the model again"):
            model.send_chat_request(HEALTHY)  # at once: no thread is left to wait on


def test_the_service_reports_a_dead_engine_and_loads_the_model_afresh(serve: Any) -> None:
    settings = serve()
    pool = next(s for s in serve.running.values() if s.settings.port == settings.port)
    pool = pool.server.config.app.state.pool
    model_id = "smol-local:1"
    request = {"model": model_id, **HEALTHY}
    with httpx.Client(base_url=settings.url, timeout=120) as client:
        assert client.post("/v1/chat/completions", json=request).status_code == 200
        dead = pool.residents()[0].model

        def hook(batch: list[ScheduledSequence]) -> None:
            raise EngineDeath("killed by the test")

        _engine(dead).fault_hook = hook
        failed = client.post("/v1/chat/completions", json=request)
        assert (
            failed.status_code == 503 and "killed by the test" in failed.json()["error"]["message"]
        )
        health = client.get("/health").json()
        assert health == {
            "status": "degraded",
            "failed_models": {model_id: "EngineDeath: killed by the test"},
        }
        again = client.post("/v1/chat/completions", json=request)  # unloads it, loads it anew
        assert again.status_code == 200, again.text
        assert pool.residents()[0].model is not dead
        assert client.get("/health").json() == {"status": "ok", "failed_models": {}}
