"""What a client may not do: send a body past the limit (413, read no further), or reach the
service from a web page of another origin (no CORS headers are ever sent)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ladle.server import ServerSettings

MB = 1 << 20


@pytest.fixture(scope="module")
def server(serve: Any) -> ServerSettings:
    return serve(max_body_mb=1)  # type: ignore[no-any-return]


def _big_chat(size: int) -> dict[str, Any]:
    return {"model": "smol", "messages": [{"role": "user", "content": "x" * size}]}


def test_a_body_over_the_limit_is_a_413(server: ServerSettings) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        declared = client.post("/v1/chat/completions", json=_big_chat(2 * MB))
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "smol", "messages": [{"role": "user", "content": "'
            for _ in range(32):
                yield b"y" * (64 * 1024)
            yield b'"}]}'

        streamed = client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert "max_body_mb" in streamed.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"  # and the service goes on
        under = client.put(
            "/v1/sessions/fits", json={"messages": [{"role": "user", "content": "a"}]}
        )
        assert under.status_code == 200


def test_no_cross_origin_access_is_granted(server: ServerSettings) -> None:
    origin = {"Origin": "https://evil.example"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        plain = client.get("/v1/models", headers=origin)
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
