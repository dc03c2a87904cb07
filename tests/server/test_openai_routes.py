"""The OpenAI routes against a real service: the `openai` client, SSE, errors, auth, metrics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from starlette.routing import Route

from ladle.server import ServerSettings, create_app

API_KEY = "sk-test-key"
MODEL = "smol-local:1"
QUESTION = [{"role": "user", "content": "Name a fruit."}]
NO_STOP = {"0": -100, "2": -100}  # SmolLM2's end tokens: the stream runs to max_tokens

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerSettings]) -> ServerSettings:
    return serve(api_key=API_KEY)


@pytest.fixture(scope="module")
def client(server: ServerSettings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(server: ServerSettings) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


def test_chat_stream_and_not_agree(client: openai.OpenAI) -> None:
    request = {"model": "smol", "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    response = client.chat.completions.create(**request)  # type: ignore[call-overload]
    text = response.choices[0].message.content
    assert text and response.model == MODEL
    assert response.usage is not None and response.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_chunk(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    request = {"model": MODEL, "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}
    completion = client.completions.create(**request)  # type: ignore[call-overload]
    assert completion.object == "text_completion" and completion.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**request, stream=True)  # type: ignore[call-overload]
    )
    assert streamed == completion.choices[0].text


def test_models_lists_the_cached_and_loaded_models(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    models = client.models.list().data
    # loaded first; then local models (the built-in ones are not downloaded here)
    assert [m.id for m in models] == [MODEL, "smol-b-local:1"]
    assert models[0].owned_by == "HuggingFaceTB" and models[0].object == "model"


def test_every_route_but_health_needs_the_key(server: ServerSettings) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok", "failed_models": {}}
        routes = [r for r in create_app(server).routes if isinstance(r, Route)]
        every = {(m, re.sub(r"{[^}]+}", "x", r.path)) for r in routes for m in r.methods or ()}
        assert len(every) > 30
        for method, path in sorted(every - {("GET", "/health"), ("HEAD", "/health")}):
            response = http.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 401, (method, path)
            if method != "HEAD":
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401  # no header at all
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"model": "smol", "messages": [', 400, None, None),
        (b"[1, 2]", 400, None, None),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], '
         b'"max_tokens": "many"}', 400, "max_tokens", None),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], '
         b'"temperature": 9}', 400, "temperature", None),
        (b'{"model": "smol", "messages": [{"role": "robot", "content": "hi"}]}',
         400, "messages[0].role", None),
        (b'{"model": "smol"}', 400, "messages", None),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
         404, "model", "model_not_found"),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], '
         b'"stream": true, "n": 0}', 400, "n", None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    http: httpx.Client, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    response = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    ok = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_unknown_routes_and_methods_get_openai_errors(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v1/chat/completions").status_code == 405


def test_openai_client_raises_not_found_for_an_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"


def test_client_that_disconnects_mid_stream_frees_its_request(
    server: ServerSettings, http: httpx.Client
) -> None:
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 2000,
        "logit_bias": NO_STOP,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as streaming:  # noqa: SIM117
        with streaming.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(4)]  # a few tokens arrive, then we hang up
    assert _wait_for(lambda: _in_flight(http) == 0)
    started = time.monotonic()
    ok = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    )
    assert ok.status_code == 200
    assert time.monotonic() - started < 10  # not queued behind 2000 abandoned tokens


def test_metrics_count_requests_tokens_and_latency(http: httpx.Client) -> None:
    http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True},
    )
    text = http.get("/metrics").text
    assert re.search(
        r'ladle_requests_total\{route="/v1/chat/completions",method="POST",status="200"\} [1-9]',
        text,
    )
    assert re.search(r'ladle_requests_total\{route="unmatched",method="GET",status="401"\}', text)
    assert re.search(rf'ladle_prompt_tokens_total\{{model="{MODEL}"\}} [1-9]', text)
    assert re.search(rf'ladle_completion_tokens_total\{{model="{MODEL}"\}} [1-9]', text)
    assert re.search(rf'ladle_time_to_first_token_seconds_count\{{model="{MODEL}"\}} [1-9]', text)
    assert 'ladle_request_duration_seconds_bucket{route="/v1/models",le="+Inf"}' in text
    assert "ladle_loaded_models 1" in text
    assert f'ladle_model_load_seconds_count{{model="{MODEL}"}} 1' in text
    assert re.search(rf'ladle_kv_cache_blocks\{{model="{MODEL}"\}} [1-9]', text)
    assert f'ladle_sequences_waiting{{model="{MODEL}"}} 0' in text
    assert f'ladle_model_compiled{{model="{MODEL}"}} 0' in text  # the tests run eagerly
    assert f'ladle_model_compiling{{model="{MODEL}"}} 0' in text


def _in_flight(http: httpx.Client) -> int:
    match = re.search(
        rf'ladle_requests_in_flight\{{model="{MODEL}"\}} (\d+)', http.get("/metrics").text
    )
    assert match is not None
    return int(match.group(1))


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
