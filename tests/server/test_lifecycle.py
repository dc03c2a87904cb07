"""Which models stay loaded: TTL, forced and refused unloads, LRU eviction, shared first loads."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ladle.server import ServerSettings

SMOL, SMOL_B = "smol-local:1", "smol-b-local:1"  # one file under two aliases
QUESTION = [{"role": "user", "content": "Name a fruit."}]
NO_STOP = {"0": -100, "2": -100}  # SmolLM2's end tokens: the stream runs to max_tokens

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerSettings]) -> ServerSettings:
    return serve(max_loaded_models=1)


@pytest.fixture
def http(server: ServerSettings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_a_model_idle_for_its_ttl_is_unloaded(http: httpx.Client) -> None:
    response = http.get(f"/openai/load/{SMOL}", params={"ttl": 1})
    assert response.status_code == 200 and response.content == b""
    assert http.get("/openai/loadedmodels").json() == [SMOL]
    assert _wait_for(lambda: http.get("/openai/loadedmodels").json() == [])


def test_concurrent_first_requests_load_the_model_once(http: httpx.Client) -> None:
    loads_before = _loads(http, SMOL)
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda _: _chat(http, "smol").status_code, range(3)))
    assert statuses == [200, 200, 200]
    assert _loads(http, SMOL) == loads_before + 1
    assert http.get("/openai/loadedmodels").json() == [SMOL]


def test_the_least_recently_used_idle_model_is_evicted(http: httpx.Client) -> None:
    assert _chat(http, "smol").status_code == 200
    assert _chat(http, "smol-b").status_code == 200  # max_loaded_models=1: smol makes room
    assert http.get("/openai/loadedmodels").json() == [SMOL_B]
    assert _chat(http, SMOL).status_code == 200
    assert http.get("/openai/loadedmodels").json() == [SMOL]


def test_forced_unload_ends_a_stream_with_an_error_event(
    server: ServerSettings, http: httpx.Client
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as streaming:  # noqa: SIM117
        with streaming.stream("POST", "/v1/chat/completions", json=_long_stream(SMOL)) as stream:
            lines = (line for line in stream.iter_lines() if line)
            assert json.loads(next(lines).removeprefix("data: "))["object"].endswith("chunk")
            unloaded = http.get(f"/openai/unload/{SMOL}", params={"force": "true"})
            assert unloaded.status_code == 200
            rest = list(lines)  # the stream ends: it does not hang
    assert rest[-1] != "data: [DONE]"
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["code"] == "model_unloaded" and error["type"] == "server_error"
    assert http.get("/openai/loadedmodels").json() == []
    assert _chat(http, SMOL).status_code == 200  # the service keeps serving (and reloads)


def test_unload_without_force_is_refused_while_requests_run(
    server: ServerSettings, http: httpx.Client
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as streaming:  # noqa: SIM117
        with streaming.stream("POST", "/v1/chat/completions", json=_long_stream(SMOL)) as stream:
            lines = stream.iter_lines()  # kept: dropping it would close the stream
            assert next(lines).startswith("data: ")
            busy = http.get(f"/openai/unload/{SMOL}")
            assert busy.status_code == 409
            assert busy.json()["error"]["code"] == "model_busy"
            no_room = _chat(http, SMOL_B)  # the one slot is busy: no waiting, a clear 503
            assert no_room.status_code == 503
            assert no_room.json()["error"]["code"] == "model_capacity"
            assert http.get("/openai/loadedmodels").json() == [SMOL]
    assert _wait_for(lambda: http.get(f"/openai/unload/{SMOL}").status_code == 200)
    assert http.get("/openai/loadedmodels").json() == []


def test_a_model_larger_than_the_memory_budget_is_refused(
    serve: Callable[..., ServerSettings],
) -> None:
    small = serve(memory_budget_mb=10)
    with httpx.Client(base_url=small.url, timeout=60) as http:
        response = _chat(http, SMOL)
        assert response.status_code == 503
        assert "memory budget of 10 MB" in response.json()["error"]["message"]
        assert http.get("/health").status_code == 200


def _chat(http: httpx.Client, model: str) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": model, "messages": QUESTION, "max_tokens": 2}
    )


def _long_stream(model: str) -> dict[str, object]:
    return {
        "model": model,
        "messages": QUESTION,
        "max_tokens": 2000,
        "logit_bias": NO_STOP,
        "stream": True,
    }


def _loads(http: httpx.Client, model: str) -> int:
    text = http.get("/metrics").text
    match = re.search(rf'ladle_model_load_seconds_count\{{model="{model}"\}} (\d+)', text)
    return int(match.group(1)) if match else 0


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
