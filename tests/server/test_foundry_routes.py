"""Foundry Local's management routes, with the field names and shapes its clients read."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from ladle.server import ServerSettings

SMOL, SMOL_B, DL, GONE = (
    "smol-local:1",
    "smol-b-local:1",
    "smol-dl-generic-cpu:1",
    "gone-generic-cpu:1",
)
BUILTIN = "smollm2-135m-instruct"  # in the built-in catalog, never downloaded in these tests
LIST_FIELDS = {
    "name", "displayName", "alias", "version", "uri", "providerType", "modelType",
    "promptTemplate", "publisher", "task", "license", "licenseDescription", "parentModelUri",
    "runtime", "fileSizeMb", "modelSettings", "supportsToolCalling", "maxOutputTokens",
    "minFLVersion",
}  # fmt: skip
STRING_FIELDS = LIST_FIELDS - {
    "promptTemplate",
    "runtime",
    "fileSizeMb",
    "modelSettings",
    "supportsToolCalling",
    "maxOutputTokens",
    "minFLVersion",
}  # fmt: skip; Foundry's SDK rejects null in these
PROGRESS = re.compile(r"Total \d+\.\d% Downloading SmolLM2-135M-Instruct\.Q4_1\.gguf")

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerSettings]) -> ServerSettings:
    return serve()


@pytest.fixture
def http(server: ServerSettings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_foundry_list_is_a_bare_array_with_foundry_fields(
    http: httpx.Client, smollm2_path: Path
) -> None:
    entries = http.get("/foundry/list").json()
    assert isinstance(entries, list) and len(entries) > 4
    for entry in entries:
        assert set(entry) == LIST_FIELDS
        assert all(isinstance(entry[f], str) for f in STRING_FIELDS)
        assert set(entry["runtime"]) == {"deviceType", "executionProvider"}
        assert isinstance(entry["modelSettings"]["parameters"], list)
    dl = next(e for e in entries if e["name"] == DL)
    assert dl == {
        "name": DL,
        "displayName": "smol-dl",
        "alias": "smol-dl",
        "version": "1",
        "uri": smollm2_path.parent.as_uri(),
        "providerType": "File",
        "modelType": "GGUF",
        "promptTemplate": {"assistant": "{Content}", "prompt": "{Content}"},
        "publisher": "HuggingFaceTB",
        "task": "chat-completion",
        "license": "apache-2.0",
        "licenseDescription": "",
        "parentModelUri": "",
        "runtime": {"deviceType": "CPU", "executionProvider": "CPUExecutionProvider"},
        "fileSizeMb": round(smollm2_path.stat().st_size / 2**20),
        "modelSettings": {"parameters": []},
        "supportsToolCalling": False,
        "maxOutputTokens": dl["maxOutputTokens"],
        "minFLVersion": None,
    }
    assert isinstance(dl["maxOutputTokens"], int)


def test_status_reports_the_endpoint_and_model_folder(
    http: httpx.Client, server: ServerSettings
) -> None:
    assert http.get("/openai/status").json() == {
        "endpoints": [server.url],
        "modelDirPath": str(server.cache_dir),
        "pipeName": None,
        "isAutoRegistrationResolved": True,
    }


def test_download_streams_progress_lines_then_a_json_result(
    http: httpx.Client, server: ServerSettings
) -> None:
    assert http.get("/openai/models").json() == [SMOL, SMOL_B]  # local models are ready
    body = {  # what Foundry's `FoundryModelInfo.to_download_body` sends
        "model": {
            "Name": DL,
            "Uri": "file:///ignored",
            "Publisher": "HuggingFaceTB",
            "ProviderType": "File",
            "PromptTemplate": {"assistant": "{Content}", "prompt": "{Content}"},
        },
        "token": None,
        "IgnorePipeReport": True,
    }
    with http.stream("POST", "/openai/download", json=body) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    *progress, last = lines
    assert progress and all(PROGRESS.fullmatch(line) for line in progress), progress
    assert progress[-1].startswith("Total 100.0%")
    assert json.loads(last) == {"success": True, "errorMessage": None}
    assert http.get("/openai/models").json() == [SMOL, SMOL_B, DL]
    assert server.cache_dir is not None and any(server.cache_dir.rglob("*.gguf"))


def test_a_failed_download_reports_in_the_last_line(http: httpx.Client) -> None:
    response = http.post("/openai/download", json={"model": GONE})  # a bare id, as in the docs
    assert response.status_code == 200
    result = json.loads(response.text.splitlines()[-1])
    assert result["success"] is False
    assert GONE in result["errorMessage"] and "gone.gguf" in result["errorMessage"]
    assert GONE not in http.get("/openai/models").json()


class _SlowFile(BaseHTTPRequestHandler):
    """Serves SIZE bytes in small, slow chunks; records how many it sent before the end."""

    SIZE = 8 << 20
    sent: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.SIZE))
        self.end_headers()
        sent = 0
        try:
            while sent < self.SIZE:
                self.wfile.write(b"\0" * 65536)
                sent += 65536
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the downloader hung up: that is what the test waits for
        finally:
            self.sent.append(sent)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_client_that_hangs_up_cancels_its_download(
    http: httpx.Client, test_catalog: Path, server: ServerSettings
) -> None:
    source = ThreadingHTTPServer(("127.0.0.1", 0), _SlowFile)
    threading.Thread(target=source.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{source.server_port}/slow.gguf"
        catalog = json.loads(test_catalog.read_text())
        catalog["models"].append(
            {"id": "slow-generic-cpu:1", "alias": "slow", "format": "gguf",
             "files": [{"name": "slow.gguf", "size": _SlowFile.SIZE, "source": url}]}
        )  # fmt: skip
        test_catalog.write_text(json.dumps(catalog))  # the service rereads its catalog
        with http.stream("POST", "/openai/download", json={"model": "slow-generic-cpu:1"}) as r:
            assert next(r.iter_lines()).startswith("Total ")
        assert _wait_for(lambda: bool(_SlowFile.sent))  # the download stopped reading
        assert _SlowFile.sent[0] < _SlowFile.SIZE
        assert server.cache_dir is not None
        folder = server.cache_dir / "slow-generic-cpu--1"
        assert _wait_for(lambda: not folder.exists())  # a cancel leaves nothing behind
        assert "slow-generic-cpu:1" not in http.get("/openai/models").json()
    finally:
        source.shutdown()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": {"Name": "no-such-model:1"}}, 404, "model"),
        ({"model": {"Uri": "x"}}, 400, "model.Name"),
        ({"token": "t"}, 400, "model"),
    ],
)
def test_bad_download_requests_get_openai_errors(
    http: httpx.Client, body: dict[str, object], status: int, param: str
) -> None:
    response = http.post("/openai/download", json=body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_load_and_unload_a_downloaded_model(http: httpx.Client) -> None:
    assert http.get("/openai/loadedmodels").json() == []
    loaded = http.get(f"/openai/load/{DL}", params={"ttl": 30, "ep": "cpu"})
    assert loaded.status_code == 200 and loaded.content == b""
    assert http.get("/openai/loadedmodels").json() == [DL]
    chat = http.post(
        "/v1/chat/completions",
        json={"model": "smol-dl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    assert chat.json()["model"] == DL
    unloaded = http.get(f"/openai/unload/{DL}", params={"force": "false"})
    assert unloaded.status_code == 200 and unloaded.content == b""
    assert http.get("/openai/loadedmodels").json() == []
    assert http.get(f"/openai/unload/{DL}").status_code == 200  # not loaded: nothing to do


@pytest.mark.parametrize(
    ("path", "status", "param", "text"),
    [
        (f"/openai/load/{SMOL}?ep=cuda", 400, "ep", "not available"),
        (f"/openai/load/{SMOL}?ttl=soon", 400, "ttl", "whole seconds"),
        (f"/openai/load/{SMOL}?ttl=-5", 400, "ttl", "negative"),
        (f"/openai/unload/{SMOL}?force=maybe", 400, "force", "true or false"),
        ("/openai/load/no-such-model", 404, "model", "not found"),
        ("/openai/unload/no-such-model", 404, "model", "not found"),
        (f"/openai/load/{BUILTIN}", 404, "model", "No OpenAIService provider found"),
    ],
)
def test_bad_load_and_unload_requests_get_openai_errors(
    http: httpx.Client, path: str, status: int, param: str, text: str
) -> None:
    response = http.get(path)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"]


def test_serve_picks_a_free_port_reports_it_and_stops_on_sigterm(
    ladle_home: Path, test_catalog: Path
) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ladle.server import ServerSettings, serve\n"
        "cache, catalog = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "settings = ServerSettings(cache_dir=cache, catalog_paths=(catalog,))\n"
        "serve(settings, on_ready=lambda url: print(url, flush=True))\n"
    )
    cache = ladle_home / "serve-cache"
    args = [sys.executable, "-c", script, str(cache), str(test_catalog)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
            status = httpx.get(f"{url}/openai/status", timeout=30).json()
            assert status["endpoints"] == [url] and status["modelDirPath"] == str(cache)
            process.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal to end the process
            assert process.wait(timeout=30) == -signal.SIGTERM
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health")
        finally:
            process.kill()


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
