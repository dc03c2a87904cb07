"""Time limits: a request past its deadline ends with a 504 (an error event in a stream) and
its sequence leaves the engine; a client that stops reading its stream is cut off, and the
engine is free of it."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from ladle.server import ServerSettings

pytestmark = pytest.mark.real_model

MODEL = "smol-local:1"
ENDLESS = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from one to a million."}],
    "max_tokens": 6000,
    "logit_bias": {0: -100, 2: -100},  # SmolLM2's end tokens: it runs to max_tokens
}


@pytest.fixture(scope="module")
def server(serve: Any) -> ServerSettings:
    settings: ServerSettings = serve(stall_timeout=1.0)
    with httpx.Client(base_url=settings.url, timeout=120) as client:
        assert client.get(f"/openai/load/{MODEL}").status_code == 200
    return settings


def _running(client: httpx.Client) -> float:
    """Sequences the model is running now, from `/metrics`."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ladle_sequences_running") and MODEL in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no running-sequences gauge for the model")


def _wait_until_idle(client: httpx.Client) -> float:
    deadline = time.monotonic() + 60
    while _running(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _running(client)


def test_a_request_past_its_timeout_is_a_504(server: ServerSettings) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        late = client.post("/v1/chat/completions", json={**ENDLESS, "timeout": 0.5})
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "deadline_exceeded"
        with client.stream(
            "POST", "/v1/chat/completions", json={**ENDLESS, "timeout": 0.5, "stream": True}
        ) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "deadline_exceeded"  # and no [DONE]
        assert _wait_until_idle(client) == 0  # both sequences left the engine
        bad = client.post("/v1/chat/completions", json={**ENDLESS, "timeout": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout"


def test_a_client_that_stops_reading_is_cut_off(serve: Any, server: ServerSettings) -> None:
    # small socket buffers on both ends, and large chunks (20 logprobs a token): the server's
    # sends block within seconds of the client's last read, as over a slow network
    listener = serve.running[server.port].sock
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # accepted sockets inherit
    heavy = {**ENDLESS, "stream": True, "logprobs": True, "top_logprobs": 20}
    body = json.dumps(heavy).encode()
    host, port = server.url.removeprefix("http://").split(":")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    reader.connect((host, int(port)))
    reader.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            deadline = time.monotonic() + 60
            while not _running(client) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _running(client) == 1  # it streams, into buffers nobody empties
            assert _wait_until_idle(client) == 0  # cut off well before its 6000 tokens
            after = client.post("/v1/chat/completions", json={**ENDLESS, "max_tokens": 4})
            assert after.status_code == 200
    finally:
        reader.close()
