"""Overload is refused at once: past a model's running and waiting requests, a 503 with
`Retry-After` and an OpenAI error body; the held requests go on, and the model serves again
once they end."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smol-local:1"
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 2000,
    "stream": True,
}


def test_a_full_queue_is_a_503_with_retry_after(serve: Any) -> None:
    settings = serve(max_num_seqs=1, max_queue=1)
    with httpx.Client(base_url=settings.url, timeout=120) as client:
        assert client.get(f"/openai/load/{MODEL}").status_code == 200
        with (
            client.stream("POST", "/v1/chat/completions", json=LONG) as running,
            client.stream("POST", "/v1/chat/completions", json=LONG) as waiting,
        ):
            assert running.status_code == waiting.status_code == 200  # one runs, one waits
            refused = client.post("/v1/chat/completions", json={**LONG, "stream": False})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert error["code"] == "overloaded" and MODEL in error["message"]
            first = next(running.iter_lines())
            assert first.startswith("data: ")  # the held streams go on
        # the streams closed: their requests end, and the model takes new ones
        deadline = time.monotonic() + 60
        while True:
            answer = client.post(
                "/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 4}
            )
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text


def test_a_request_counts_its_n_choices_against_the_queue(serve: Any) -> None:
    """Choices are sequences: `n` fills the queue as `n` requests do, so one request cannot
    slip hundreds of sequences past the bound; an idle model still takes any single one."""
    settings = serve(max_num_seqs=2, max_queue=2)
    short = {**LONG, "stream": False, "max_tokens": 2}
    with httpx.Client(base_url=settings.url, timeout=120) as client:
        assert client.get(f"/openai/load/{MODEL}").status_code == 200
        alone = client.post("/v1/chat/completions", json={**short, "n": 6})  # idle: served
        assert alone.status_code == 200, alone.text
        assert len(alone.json()["choices"]) == 6
        endless = {**LONG, "logit_bias": {"0": -100, "2": -100}}  # SmolLM2's end tokens banned
        with client.stream("POST", "/v1/chat/completions", json=endless) as running:
            assert running.status_code == 200  # holds 1 of the 4 sequences
            refused = client.post("/v1/chat/completions", json={**short, "n": 4})
            assert refused.status_code == 503, refused.text
            assert "1 sequences in flight; 4 more" in refused.json()["error"]["message"]
            completion = {"model": MODEL, "prompt": "Hi", "n": 4, "max_tokens": 2}
            assert client.post("/v1/completions", json=completion).status_code == 503
            answer = client.post("/v1/completions", json={**completion, "n": 1})
            assert answer.status_code == 200, answer.text  # beside the stream, in the batch
