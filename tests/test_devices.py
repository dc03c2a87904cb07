"""How much CPU ladle takes: a cgroup's quota caps the thread count that torch would pick."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ladle import builders
from ladle.devices import cgroup_cpu_quota


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(tmp_path: Path, cgroup: str, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    for folder, limit in limits.items():
        _write(root / folder / "cpu.max", limit + "\n")
    (root / cgroup.strip("/")).mkdir(parents=True, exist_ok=True)
    _write(tmp_path / "membership", f"0::{cgroup}\n")
    return root, tmp_path / "membership"


def test_a_v2_quota_is_read_from_cpu_max(tmp_path: Path) -> None:
    root, membership = _v2(tmp_path, "/ladle.slice", {"ladle.slice": "150000 100000"})
    assert cgroup_cpu_quota(root, membership) == 1.5


def test_no_v2_limit_is_none(tmp_path: Path) -> None:
    root, membership = _v2(tmp_path, "/ladle.slice", {"ladle.slice": "max 100000"})
    assert cgroup_cpu_quota(root, membership) is None


def test_the_tightest_limit_on_the_way_to_the_root_wins(tmp_path: Path) -> None:
    limits = {"a": "100000 100000", "a/b": "300000 100000", "a/b/c": "max 100000"}
    root, membership = _v2(tmp_path, "/a/b/c", limits)
    assert cgroup_cpu_quota(root, membership) == 1.0


def test_a_container_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    """With a cgroup namespace the process's path names a folder its view does not have."""
    root = tmp_path / "cgroup"
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "membership", "4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(root, tmp_path / "membership") == 2.0


def test_v1_reads_the_cpu_controller_folder_and_skips_unlimited_ones(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct"
    _write(folder / "cpu.cfs_quota_us", "-1\n")  # the root: no limit
    _write(folder / "cpu.cfs_period_us", "100000\n")
    _write(folder / "job" / "cpu.cfs_quota_us", "50000\n")
    _write(folder / "job" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "membership", "3:cpu,cpuacct:/job\n")
    assert cgroup_cpu_quota(root, tmp_path / "membership") == 0.5


@pytest.mark.parametrize("cpu_max", ["lots of cpu", "100000 0", ""])
def test_unreadable_or_malformed_files_limit_nothing(tmp_path: Path, cpu_max: str) -> None:
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None
    root, membership = _v2(tmp_path, "/x", {"x": cpu_max})
    assert cgroup_cpu_quota(root, membership) is None
    membership.write_text("a line without colons\n")
    assert cgroup_cpu_quota(root, membership) is None


@pytest.mark.parametrize(("quota", "cap"), [(0.5, 1), (1.2, 2), (None, None)])
def test_the_default_thread_count_stays_within_the_quota(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, cap: int | None
) -> None:
    monkeypatch.setattr(builders, "cgroup_cpu_quota", lambda: quota)
    expected = min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    assert builders.available_cores() == (expected if cap is None else min(expected, cap))


def test_a_process_in_a_real_cgroup_v1_with_half_a_cpu_runs_one_thread() -> None:
    """On a machine whose cgroup v1 cpu hierarchy is writable (this project's, as root)."""
    parent = Path("/sys/fs/cgroup/cpu")
    folder = parent / f"ladle-test-{os.getpid()}"
    try:
        folder.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup under {parent}: {e}")
    try:
        (folder / "cpu.cfs_quota_us").write_text("50000")  # with the default period, 0.5 CPU
        procs = folder / "cgroup.procs"
        code = "from ladle.builders import available_cores; print(available_cores())"
        done = subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip() == "1"
    finally:
        folder.rmdir()  # its one process has exited
