"""State files under `kill -9`: a process killed while it writes leaves the old or the new file.

A child process rewrites the state over and over while the parent kills it at random moments;
after every kill the file must parse and hold one of the states the child was writing. With a
plain `open(path, "w").write(...)` the kill lands between the truncation and the write often
enough that these tests fail within a few rounds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from ladle.store.atomic import write_atomic
from ladle.store.catalog import LOCAL_MODELS_FILE, Catalog

KILLS = 12


def _rewrite_forever(path: Path, texts: list[str]) -> None:
    for i in range(10**9):
        write_atomic(path, texts[i % len(texts)])


def _register_forever(home: Path, model: Path) -> None:
    catalog = Catalog(home=home)
    for i in range(10**9):
        if i % 2:
            catalog.unregister_local("flip")
        else:
            catalog.register_local("flip", model)


def _kill_at_random(target: object, args: tuple[object, ...], check: object, seed: int) -> None:
    """Start `target(*args)` in a forked child, kill it mid-work `KILLS` times, `check()` each."""
    rng = random.Random(seed)
    context = multiprocessing.get_context("fork")  # no second import of torch per round
    for _ in range(KILLS):
        child = context.Process(target=target, args=args)
        child.start()
        time.sleep(rng.uniform(0.02, 0.12))
        assert child.pid is not None and child.is_alive()
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        check()  # type: ignore[operator]


def test_a_killed_writer_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    texts = [json.dumps({"n": n, "pad": "x" * (1 << 18) * n}) for n in (1, 2, 3)]
    write_atomic(path, texts[0])

    def check() -> None:
        assert path.read_text(encoding="utf-8") in texts

    _kill_at_random(_rewrite_forever, (path, texts), check, seed=1)
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(name.startswith(".state.json.") for name in leftovers)  # hidden temp files only


def test_write_keeps_a_secret_private_from_the_first_byte(tmp_path: Path) -> None:
    write_atomic(tmp_path / "service.json", "{}", mode=0o600)
    assert (tmp_path / "service.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("registered", [0, 100])
def test_a_registration_killed_midway_loses_nothing(tmp_path: Path, registered: int) -> None:
    """The registered-models file under kills: every other registration survives intact."""
    home = tmp_path / "home"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    catalog = Catalog(home=home)
    for i in range(registered):  # a bigger file widens a torn write's window
        catalog.register_local(f"kept-{i}", model)
    file = home / LOCAL_MODELS_FILE

    def check() -> None:
        if not file.exists():  # the first registration had not landed yet
            assert registered == 0
            return
        aliases = {e["alias"] for e in json.loads(file.read_text(encoding="utf-8"))["models"]}
        assert {f"kept-{i}" for i in range(registered)} <= aliases
        assert aliases - {f"kept-{i}" for i in range(registered)} <= {"flip", "after"}

    _kill_at_random(_register_forever, (home, model), check, seed=registered)
    Catalog(home=home).register_local("after", model)  # the lock a killed child held is free
    check()
