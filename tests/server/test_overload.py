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
