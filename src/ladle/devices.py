"""Which devices ladle's engine runs models on, and how much of the CPU it may use.

The catalog picks an alias's variant by it and the manager the execution provider it sends to
the service. The engine runs on the CPU only for now (the builders refuse other devices), so
a CUDA variant is never chosen, even where torch sees a GPU.
"""

from __future__ import annotations

from pathlib import Path


def runnable_device_types() -> frozenset[str]:
    """Catalog device types ("CPU", "GPU") whose variants this machine's engine can run."""
    return frozenset({"CPU"})


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs' worth of time this process's cgroups allow (`docker run --cpus 1.5`: 1.5), or None.

    A container's CPU quota leaves every core visible, so thread counts taken from the cores
    (torch's, os.sched_getaffinity) oversubscribe it: the quota then stalls OpenMP threads in
    the middle of a step while the others spin waiting for them. The limit is the smallest
    on the path from the process's cgroup to the root, read from cgroup v2's `cpu.max` or
    v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)  # hierarchy id, controllers, path
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # the v2 hierarchy: mounted at root, or at root/unified (hybrid)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limits += [q for d in _ancestry(base, path) if (q := _v2_quota(d)) is not None]
        elif "cpu" in controllers.split(","):
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
            limits += [q for d in _ancestry(base, path) if (q := _v1_quota(d)) is not None]
    return min(limits, default=None)


def _ancestry(base: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to `base`; just `base` when the process sees
    its own cgroup as the root (a container's cgroup namespace), where the path is not."""
    here = base / path.strip("/")
    if not here.is_dir():
        return [base]
    folders = [here, *here.parents]
    return folders[: folders.index(base) + 1]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):  # the root has none; a malformed one
        return None  # limits nothing


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
