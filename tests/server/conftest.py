"""Real services on free loopback ports, each on a thread with its own home, cache and catalog.

A test module starts its service once (module scope), so the 98 MB model loads as few times
as possible. `LADLE_HOME` points at a temporary folder meanwhile, so the user's own catalog
files and registered models never leak in. The test catalog names the real SmolLM2 file:

    smol-local:1, smol-b-local:1     the GGUF used in place (two aliases, one file)
    smol-dl-generic-cpu:1            the same file behind a file:// source, to download
    gone-generic-cpu:1               a file:// source that does not exist
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from ladle.server import ServerSettings, create_app
from ladle.server.app import bind

START_TIMEOUT = 60.0


class _ServerThread:
    """uvicorn serving `create_app(settings)` on a thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.sock = bind("127.0.0.1", 0)
        self.settings = replace(settings, port=self.sock.getsockname()[1])
        config = uvicorn.Config(
            create_app(self.settings), log_config=None, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def ladle_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh `LADLE_HOME` for this module's services."""
    home = tmp_path_factory.mktemp("ladle-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_HOME", str(home))
        mp.delenv("LADLE_CATALOG_PATH", raising=False)
        mp.delenv("LADLE_CACHE_DIR", raising=False)
        yield home


@pytest.fixture(scope="session")
def smollm2_sha256(smollm2_path: Path) -> str:
    return hashlib.sha256(smollm2_path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def test_catalog(ladle_home: Path, smollm2_path: Path, smollm2_sha256: str) -> Path:
    """A user catalog file with the entries the module docstring lists."""
    gguf = {"name": smollm2_path.name, "size": smollm2_path.stat().st_size, "sha256": None}
    local = {"format": "gguf", "uri": smollm2_path.as_uri(), "provider_type": "Local"}
    entries = [
        {"id": f"{alias}-local:1", "alias": alias, "publisher": "HuggingFaceTB", **local,
         "files": [{**gguf, "source": smollm2_path.as_uri()}]}
        for alias in ("smol", "smol-b")
    ] + [
        {"id": "smol-dl-generic-cpu:1", "alias": "smol-dl", "format": "gguf",
         "publisher": "HuggingFaceTB", "license": "apache-2.0",
         "prompt_template": {"assistant": "{Content}", "prompt": "{Content}"},
         "files": [{**gguf, "sha256": smollm2_sha256, "source": smollm2_path.as_uri()}]},
        {"id": "gone-generic-cpu:1", "alias": "gone", "format": "gguf",
         "files": [{"name": "gone.gguf", "size": 10, "sha256": None,
                    "source": (ladle_home / "gone.gguf").as_uri()}]},
    ]  # fmt: skip
    path = ladle_home / "test-catalog.json"
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")
    return path


class Services:
    """`serve(**settings)` starts a service on a free port (cache and catalog in the module's
    home) and returns its settings; `serve.stop(settings)` stops it (a restart is a stop and
    a new start); the rest are stopped after the module."""

    def __init__(self, home: Path, catalog: Path) -> None:
        self.home, self.catalog = home, catalog
        self.running: dict[int, _ServerThread] = {}

    def __call__(self, **overrides: Any) -> ServerSettings:
        settings = ServerSettings(
            cache_dir=self.home / "models", catalog_paths=(self.catalog,), **overrides
        )
        server = _ServerThread(settings)
        server.start()
        self.running[server.settings.port] = server
        return server.settings

    def stop(self, settings: ServerSettings) -> None:
        self.running.pop(settings.port).stop()


@pytest.fixture(scope="module")
def serve(ladle_home: Path, test_catalog: Path) -> Iterator[Services]:
    services = Services(ladle_home, test_catalog)
    yield services
    for server in services.running.values():
        server.stop()
