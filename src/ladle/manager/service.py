"""Find, start and stop the local model service running in the background.

Every running service records itself in a state file under `$LADLE_HOME/service/`, one per
cache folder (two services never share a cache), named by a hash of the folder's path:

    <key>.json    pid, host, port, cache folder, API key, start time (mode 0600)
    <key>.log     what a background service writes (stdout and stderr)

The serving process writes its own state file and removes it when it exits, so `ladle serve`
in a terminal and `ladle service start` in the background are found the same way. A state file
whose process is gone is stale and is removed by whoever reads it. A background service is
detached through a short-lived launcher, so no caller is left with a zombie to reap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from ladle import envconfig
from ladle.errors import ServiceError
from ladle.store.atomic import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT = 120.0  # importing torch and binding take seconds on a cold laptop
STOP_TIMEOUT = 15.0
_POLL = 0.1
# The launcher starts the service in a new session and exits at once; the service is then
# reparented to init, which reaps it, instead of lingering as the caller's zombie.
_LAUNCHER = (
    "import subprocess, sys\n"
    "with open(sys.argv[1], 'ab') as log:\n"
    "    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,"
    " stderr=subprocess.STDOUT, start_new_session=True)\n"
    "print(p.pid)\n"
)


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What a running service recorded about itself."""

    pid: int
    host: str
    port: int
    cache_dir: str
    api_key: str | None = None
    started: float = 0.0

    @property
    def uri(self) -> str:
        """The base URL a client on this machine connects to."""
        host = DEFAULT_HOST if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def status_url(self) -> str:
        """What `ladle service status` prints: the service's `/openai/status` route."""
        return f"{self.uri}/openai/status"


def service_dir() -> Path:
    """`$LADLE_HOME/service`: state and log files of running services."""
    return envconfig.home() / "service"


def state_file(cache_dir: Path) -> Path:
    """The state file of the service for `cache_dir`."""
    key = hashlib.sha256(str(_canonical(cache_dir)).encode()).hexdigest()[:16]
    return service_dir() / f"{key}.json"


def log_file(cache_dir: Path) -> Path:
    """Where a background service for `cache_dir` writes its output."""
    return state_file(cache_dir).with_suffix(".log")


def find(cache_dir: Path | None = None) -> ServiceState | None:
    """The running service for `cache_dir`; without one, the service this user runs.

    That is the service on the default cache folder if it runs, else the most recently
    started of the user's running services, else None.
    """
    if cache_dir is not None:
        return _read(state_file(cache_dir))
    own = _read(state_file(envconfig.cache_dir()))
    if own is not None:
        return own
    running = list_running()
    return max(running, key=lambda s: s.started) if running else None


def list_running() -> list[ServiceState]:
    """Every running service of this user; stale state files are removed on the way."""
    folder = service_dir()
    if not folder.is_dir():
        return []
    return [s for path in sorted(folder.glob("*.json")) if (s := _read(path)) is not None]


def is_healthy(state: ServiceState, timeout: float = 2.0) -> bool:
    """Whether the service answers `GET /health` (directly: no proxy stands in for loopback).

    The standard library's client, not httpx: the service itself checks this, and importing
    httpx (with its CLI's click, rich and pygments) would cost it 6 MB of memory.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{state.uri}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, HTTPException):  # refused, timed out, an error status (HTTPError)
        return False


@contextlib.contextmanager
def registration(cache_dir: Path, api_key: str | None = None) -> Iterator[Callable[[str], None]]:
    """Record this process as the service for `cache_dir` while the block runs.

    Yields `on_ready(url)`: call it once the service listens on `url`; it writes the state
    file, which is removed when the block ends. Raises `ServiceError` when another live
    service already serves that cache folder (checked at once, and again when recording).
    """
    path = state_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_free(path)

    def on_ready(url: str) -> None:
        parts = urlsplit(url)
        state = ServiceState(
            pid=os.getpid(),
            host=parts.hostname or DEFAULT_HOST,
            port=parts.port or 80,
            cache_dir=str(_canonical(cache_dir)),
            api_key=api_key,
            started=time.time(),
        )
        with FileLock(f"{path}.lock"):
            _check_free(path)
            _write(path, state)

    try:
        yield on_ready
    finally:
        with FileLock(f"{path}.lock"):
            current = _read(path)
            if current is not None and current.pid == os.getpid():
                path.unlink(missing_ok=True)


def start(
    *,
    port: int = 0,
    cache_dir: Path | None = None,
    api_key: str | None = None,
    timeout: float = START_TIMEOUT,
) -> ServiceState:
    """Start a background service for `cache_dir` (default: the user's cache) on `port`.

    If a service already runs for that cache folder it is returned as it is. Otherwise waits
    until the new one answers `/health`; `ServiceError` if it exits or `timeout` passes first.

    Args:
        port: the port to pin; 0 lets the service take a free one (it records which).
        cache_dir: the cache the service serves; one service per cache folder.
        api_key: the Bearer key to require (default: `LADLE_API_KEY`, else none).
        timeout: seconds to wait for the service to answer.
    """
    cache = _canonical(cache_dir or envconfig.cache_dir())
    path = state_file(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.start.lock"):  # two starters at once start one service
        running = _read(path)
        if running is not None:
            return running
        log = log_file(cache)
        pid = _spawn(port, cache, api_key, log)
        return _wait_ready(pid, path, log, timeout)


def stop(cache_dir: Path | None = None, timeout: float = STOP_TIMEOUT) -> ServiceState | None:
    """Stop the service `find(cache_dir)` names; return what it was, or None if none ran.

    Sends SIGTERM so the service finishes cleanly, then SIGKILL if it is still there after
    `timeout` seconds.
    """
    state = find(cache_dir)
    if state is None:
        return None
    _signal(state.pid, signal.SIGTERM)
    if not _wait_exit(state.pid, timeout):
        logger.warning("service pid %d ignored SIGTERM for %.0fs; killing it", state.pid, timeout)
        _signal(state.pid, signal.SIGKILL)
        _wait_exit(state.pid, timeout)
    state_file(Path(state.cache_dir)).unlink(missing_ok=True)
    return state


def _spawn(port: int, cache_dir: Path, api_key: str | None, log: Path) -> int:
    command = [
        sys.executable,
        "-m",
        "ladle",
        "serve",
        "--host",
        DEFAULT_HOST,
        "--port",
        str(port),
        "--cache-dir",
        str(cache_dir),
    ]
    env = dict(os.environ)
    if api_key:  # else the service takes `LADLE_API_KEY` from the environment, if set
        env[envconfig.API_KEY_VAR] = api_key
    launcher = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(log), *command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if launcher.returncode != 0:
        raise ServiceError(f"cannot start the service: {launcher.stderr.strip()[-500:]}")
    logger.info("started service pid %s, logging to %s", launcher.stdout.strip(), log)
    return int(launcher.stdout)


def _check_free(path: Path) -> None:
    running = _read(path)
    if running is not None and running.pid != os.getpid():
        raise ServiceError(
            f"a service for {running.cache_dir} already runs on {running.uri} "
            f"(pid {running.pid}); stop it with `ladle service stop`"
        )


def _wait_ready(pid: int, path: Path, log: Path, timeout: float) -> ServiceState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            raise ServiceError(f"the service exited while starting: {_tail(log)} (log: {log})")
        state = _read(path)
        if state is not None and state.pid == pid and is_healthy(state):
            return state
        time.sleep(_POLL)
    _signal(pid, signal.SIGKILL)
    raise ServiceError(f"the service did not answer within {timeout:.0f}s (log: {log})")


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _read(path: Path) -> ServiceState | None:
    """The state in `path` if its process lives; a stale or unreadable file is removed."""
    try:
        state = ServiceState(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        logger.warning("removing unreadable service state %s: %s", path, e)
        path.unlink(missing_ok=True)
        return None
    if _is_alive(state.pid):
        return state
    logger.info("removing stale service state %s (pid %d is gone)", path, state.pid)
    path.unlink(missing_ok=True)
    return None


def _write(path: Path, state: ServiceState) -> None:
    write_atomic(path, json.dumps(asdict(state), indent=2), mode=0o600)  # it may hold the API key


def _is_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """An exited process its parent has not reaped yet (Linux; elsewhere, assume not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"  # the state follows the command name


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no log"
    return " | ".join(text.strip().splitlines()[-lines:]) or "empty log"


def _canonical(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser().resolve()
