"""Background service management against real services on loopback: state files, ports, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ladle.errors import ServiceError
from ladle.manager import service
from ladle.manager.service import ServiceState


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty ladle home for this module; the default cache is inside it."""
    root = tmp_path_factory.mktemp("ladle-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_HOME", str(root))
        mp.setenv("LADLE_CACHE_DIR", str(root / "models"))
        mp.delenv("LADLE_API_KEY", raising=False)
        mp.delenv("LADLE_CATALOG_PATH", raising=False)
        yield root
        for state in service.list_running():  # nothing this module started outlives it
            service.stop(Path(state.cache_dir))


@pytest.fixture(scope="module")
def pinned_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def running(home: Path, pinned_port: int) -> ServiceState:
    return service.start(port=pinned_port)


def test_start_pins_the_port_and_serves_the_default_cache(
    running: ServiceState, home: Path, pinned_port: int
) -> None:
    assert running.port == pinned_port
    assert running.uri == f"http://127.0.0.1:{pinned_port}"
    assert running.status_url == f"http://127.0.0.1:{pinned_port}/openai/status"
    assert Path(running.cache_dir) == (home / "models").resolve()
    status = httpx.get(running.status_url).json()
    assert status["modelDirPath"] == str(home / "models")
    assert service.is_healthy(running)


def test_the_state_file_names_the_service_and_is_private(running: ServiceState, home: Path) -> None:
    path = service.state_file(home / "models")
    assert path.parent == home / "service"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    recorded = json.loads(path.read_text())
    assert (recorded["pid"], recorded["port"]) == (running.pid, running.port)
    assert service.log_file(home / "models").read_text()  # the background service logs there


def test_find_gives_the_running_service(running: ServiceState, home: Path) -> None:
    assert service.find() == running
    assert service.find(home / "models") == running
    assert service.find(home / "elsewhere") is None
    assert service.list_running() == [running]


def test_find_falls_back_to_the_users_other_service(
    running: ServiceState, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LADLE_CACHE_DIR", str(home / "another-default"))
    assert service.find() == running


def test_starting_again_returns_the_running_service(running: ServiceState) -> None:
    assert service.start() == running


def test_a_second_service_on_the_same_cache_is_refused(running: ServiceState, home: Path) -> None:
    with (
        pytest.raises(ServiceError, match=f"already runs on {running.uri}"),
        service.registration(home / "models"),
    ):
        pass


def test_registration_records_this_process_until_the_block_ends(home: Path) -> None:
    cache = home / "registered"
    with service.registration(cache, api_key="k") as on_ready:
        assert service.find(cache) is None  # not before the service listens
        on_ready("http://127.0.0.1:4321")
        state = service.find(cache)
        assert state is not None
        assert (state.pid, state.port, state.api_key) == (os.getpid(), 4321, "k")
    assert service.find(cache) is None
    assert not service.state_file(cache).exists()


def test_a_stale_state_file_is_removed(home: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    cache = home / "stale"
    path = service.state_file(cache)
    stale = {"pid": int(dead.stdout), "host": "127.0.0.1", "port": 1, "cache_dir": str(cache)}
    path.write_text(json.dumps(stale))
    assert service.find(cache) is None
    assert not path.exists()


def test_foreground_serve_records_itself_and_cleans_up_on_sigterm(home: Path) -> None:
    cache = home / "foreground"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ladle", "serve", "--cache-dir", str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        state = service.find(cache)
        assert state is not None and state.pid == proc.pid
        assert line == f"Model management service is running on {state.status_url}\n"
        assert service.is_healthy(state)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not service.state_file(cache).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_ends_the_service_and_removes_its_state(running: ServiceState, home: Path) -> None:
    assert service.stop() == running
    assert service.find() is None
    assert not service.state_file(home / "models").exists()
    assert not service.is_healthy(running)
    assert service.stop() is None


def test_a_serving_process_imports_httpx_and_llguidance_only_on_use() -> None:
    """httpx (with its CLI's rich and pygments) costs 5-6 MB and llguidance 2 MB of a server's
    memory: the client, downloads and constrained requests import them when they need them."""
    code = (
        "import sys, ladle, ladle.cli, ladle.cli.serve, ladle.server.app, ladle.manager.service\n"
        "watched = ('httpx', 'ladle.manager._base', 'llguidance')\n"
        "print(sorted(m for m in watched if m in sys.modules))\n"
        "from ladle import FoundryLocalManager\n"  # the client still imports on first use
        "print(FoundryLocalManager.__module__, 'FoundryLocalManager' in dir(ladle))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "ladle.manager._sync True"]
