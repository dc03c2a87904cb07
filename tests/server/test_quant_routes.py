"""ISQ over HTTP: /re_isq and /calibration/*, in order and out of it, on the real SmolLM2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ladle.server import ServerSettings

MODEL = "smol-local:1"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
    "temperature": 0,
    "max_tokens": 8,
}

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def client(serve: Callable[..., ServerSettings]) -> httpx.Client:
    return httpx.Client(base_url=serve().url, timeout=300)


def error(response: httpx.Response, status: int = 400) -> dict[str, str]:
    assert response.status_code == status, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


def test_re_isq_and_calibration_over_http(client: httpx.Client, ladle_home: Path) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # loads the model
    e = error(client.post("/calibration/start", json={"model": MODEL}), 409)  # valid, too early
    assert "calibration needs a model quantized in place" in e["message"]
    e = error(client.get("/calibration/status", params={"model": MODEL}), 409)
    assert "no calibration running" in e["message"]
    e = error(client.post("/re_isq", json={"ggml_type": "Q9"}))  # the one loaded model
    assert e["param"] == "ggml_type" and "unknown ISQ type 'Q9'" in e["message"]
    e = error(client.post("/re_isq", json={"model": MODEL}))
    assert e["param"] == "ggml_type"

    response = client.post("/re_isq", json={"model": MODEL, "ggml_type": "q8_0"})
    assert response.json() == {"model": MODEL, "ggml_type": "Q8_0"}
    assert client.post("/calibration/start", json={}).json()["status"] == "calibrating"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    status = client.get("/calibration/status").json()
    assert status["model"] == MODEL and status["min_rows"] > 0 and len(status["layers"]) == 120
    for outside in ("../escape.cimatrix", "/tmp/escape.cimatrix", ".hidden"):
        e = error(client.post("/calibration/apply", json={"save_cimatrix": outside}))
        assert e["param"] == "save_cimatrix"  # a name, not a path: nothing written outside
    assert client.get("/calibration/status").status_code == 200  # still calibrating
    saved = ladle_home / "calibration" / "served.cimatrix"
    response = client.post("/calibration/apply", json={"save_cimatrix": "served.cimatrix"})
    assert response.json() == {"model": MODEL, "ggml_type": "Q8_0", "saved": str(saved)}
    assert saved.is_file()
    e = error(client.post("/calibration/apply"), 409)
    assert "no calibration running" in e["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
