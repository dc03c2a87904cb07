"""`ladle service|model|cache` against a real background service.

`ladle service start|status|stop` run as a user runs them, in subprocesses; the other commands
run in-process through `cli.main` (same code, without paying an interpreter start each).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ladle import cli
from ladle.manager import service

ALIAS = "ladle-test-smollm2"
CPU_ID = "ladle-test-smollm2-generic-cpu:1"


def ladle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ladle", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`ladle ARGS` in this process: exit code, stdout, stderr."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("ladle-home")
    file = {
        "name": smollm2_path.name,
        "size": smollm2_path.stat().st_size,
        "sha256": None,
        "source": smollm2_path.as_uri(),
    }
    entry = {"id": CPU_ID, "alias": ALIAS, "format": "gguf", "files": [file]}
    (root / "catalog").mkdir()
    (root / "catalog" / "test.json").write_text(json.dumps({"models": [entry]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_HOME", str(root))
        mp.setenv("LADLE_CACHE_DIR", str(root / "models"))
        for name in ("LADLE_API_KEY", "LADLE_CATALOG_PATH"):
            mp.delenv(name, raising=False)
        yield root
        for state in service.list_running():
            service.stop(Path(state.cache_dir))


@pytest.fixture(scope="module")
def port(home: Path) -> int:
    """The pinned port of the module's service, started with `ladle service start --port`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = ladle("service", "start", "--port", str(port))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"Model management service is running on {_status_url(port)}\n"
    return port


def _status_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/openai/status"


def test_status_prints_the_services_url(port: int) -> None:
    out = ladle("service", "status")
    assert (out.returncode, out.stdout) == (
        0,
        f"Model management service is running on {_status_url(port)}\n",
    )


def test_status_json(port: int, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "service", "status", "--json")
    status = json.loads(out)
    assert code == 0
    assert status["running"] and status["port"] == port
    assert status["endpoint"] == f"http://127.0.0.1:{port}/v1"
    assert status["cacheDir"] == str((home / "models").resolve())


def test_status_of_another_cache_says_none_runs(
    port: int, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "service", "status", "--cache-dir", str(home / "other"))
    assert (code, out) == (1, "Model management service is not running.\n")
    code, out, _ = run(capsys, "service", "status", "--cache-dir", str(home / "models"))
    assert (code, out) == (0, f"Model management service is running on {_status_url(port)}\n")


def test_start_again_says_it_runs(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "service", "start")
    assert (code, out) == (
        0,
        f"Model management service is already running on {_status_url(port)}\n",
    )


def test_model_list_and_info_json(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "model", "list", "--json")
    entries = {e["id"]: e for e in json.loads(out)}
    assert code == 0
    assert entries[CPU_ID]["alias"] == ALIAS and entries[CPU_ID]["cached"] is False
    assert "smollm2-135m-instruct-q4_1-generic-cpu:1" in entries  # the built-in catalog
    code, out, _ = run(capsys, "model", "info", ALIAS, "--json")
    assert code == 0 and json.loads(out) == entries[CPU_ID]
    code, out, _ = run(capsys, "model", "list")
    assert out.split("\n")[0].split() == [
        "ALIAS",
        "DEVICE",
        "TASK",
        "SIZE",
        "CACHED",
        "MODEL",
        "ID",
    ]


def test_model_download_then_cache_list_and_location(
    port: int, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "model", "download", ALIAS)
    assert code == 0, err
    assert out.startswith(f"{CPU_ID} is in {home / 'models'}")
    code, out, _ = run(capsys, "cache", "list", "--json")
    assert [m["id"] for m in json.loads(out)] == [CPU_ID]
    code, out, _ = run(capsys, "cache", "location")
    assert out == f"{home / 'models'}\n"


def test_run_resolves_an_alias_through_the_catalog(
    port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "run", ALIAS, "Hi", "--max-tokens", "3", "--temperature", "0")
    assert code == 0, err
    assert out.strip()


def test_model_load_ps_and_unload(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "service", "ps")
    assert (code, out) == (0, "No models are loaded.\n")
    code, out, err = run(capsys, "model", "load", ALIAS, "--ttl", "60")
    assert code == 0, err
    assert out == f"Model {CPU_ID} loaded on http://127.0.0.1:{port}/v1\n"
    code, out, _ = run(capsys, "service", "ps", "--json")
    assert json.loads(out) == [{"alias": ALIAS, "id": CPU_ID}]
    code, out, _ = run(capsys, "service", "ps")
    assert out.split("\n")[1].split() == [ALIAS, CPU_ID]
    code, out, _ = run(capsys, "model", "unload", ALIAS)
    assert (code, out) == (0, f"Model {CPU_ID} unloaded\n")


def test_cache_remove(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "remove", ALIAS)
    assert (code, out) == (0, f"Removed {CPU_ID}\n")
    code, out, _ = run(capsys, "cache", "list", "--json")
    assert json.loads(out) == []
    code, _, err = run(capsys, "cache", "remove", ALIAS)
    assert code == 1 and err.startswith("error: ") and "not in the cache" in err


@pytest.mark.parametrize(
    "args",
    [
        ("model", "info", "no-such-model"),
        ("model", "load", "no-such-model"),
        ("model", "download", "x"),
    ],
)
def test_errors_are_one_line_without_traceback(
    port: int, capsys: pytest.CaptureFixture[str], args: Any
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_group_alone_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "service")
    assert code == 2 and "start" in out and "status" in out


def test_restart_keeps_the_pinned_port_and_the_sessions(
    port: int, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{port}/v1/sessions/kept"
    messages = [{"role": "user", "content": "Remember me."}]
    assert httpx.put(url, json={"messages": messages}).status_code == 200
    before = service.find()
    code, out, err = run(capsys, "service", "restart")
    assert code == 0, err
    assert out == f"Model management service is running on {_status_url(port)}\n"
    after = service.find()
    assert before is not None and after is not None and after.pid != before.pid
    assert httpx.get(url).json()["messages"] == messages  # from $LADLE_HOME/sessions.db
    assert (home / "sessions.db").is_file()


def test_stop_then_status_says_none_runs(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    stopped = ladle("service", "stop")
    assert stopped.returncode == 0
    assert stopped.stdout.startswith("Model management service stopped")
    code, out, _ = run(capsys, "service", "status")
    assert (code, out) == (1, "Model management service is not running.\n")
    code, out, _ = run(capsys, "service", "stop")
    assert (code, out) == (0, "Model management service is not running.\n")


def test_register_a_local_file_and_run_it_by_alias(
    home: Path, smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "model", "register", "my-smol", str(smollm2_path))
    assert code == 0 and out == f"Registered my-smol-local:1 -> {smollm2_path.resolve()}\n"
    code, out, _ = run(capsys, "model", "list", "--json")
    listed = {e["alias"]: e for e in json.loads(out)}
    assert listed["my-smol"]["cached"] is True  # a local model is used in place
    args = ("run", "my-smol", "Hi", "--temperature", "0", "--max-tokens", "4")
    code, by_alias, _ = run(capsys, *args)
    code_path, by_path, _ = run(capsys, "run", str(smollm2_path), *args[2:])
    assert code == code_path == 0 and by_alias == by_path and by_alias.strip()
    assert run(capsys, "model", "unregister", "my-smol")[:2] == (0, "Unregistered my-smol\n")
    code, _, err = run(capsys, "model", "unregister", "my-smol")
    assert code == 1 and "my-smol" in err
    code, _, err = run(capsys, "model", "register", "bad alias!", str(smollm2_path))
    assert code == 1 and "alias" in err
