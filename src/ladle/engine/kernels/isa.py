"""Which of the kernel library's instruction sets this CPU runs, read once.

The features come from `/proc/cpuinfo` (Linux, x86 and ARM), `sysctl` (macOS), or torch's own
CPU capability elsewhere. `LADLE_CPU_ISA` forces a set (`envconfig.cpu_isa`), so that every
set a machine can execute is tested and measured on it: an AVX-512 machine runs the AVX2 and
portable builds too. A forced set the CPU cannot run is an error, not a crash at the first
instruction.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

from ladle import envconfig
from ladle.engine.kernels.build import ISA_FLAGS, machine
from ladle.errors import UnsupportedIsaError

# The CPU features each set needs, by their /proc/cpuinfo names.
_REQUIRED: dict[str, frozenset[str]] = {
    "avx512_vnni": frozenset(
        {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c"}
    ),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
    "avx_vnni": frozenset({"avx_vnni", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "neon": frozenset({"asimd"}),
    "portable": frozenset(),
}
# macOS's sysctl names for the same features.
_DARWIN_NAMES = {
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512DQ": "avx512dq",
    "AVX512VNNI": "avx512_vnni",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
}


@functools.cache
def cpu_features() -> frozenset[str]:
    """This CPU's features, lower case, as /proc/cpuinfo names them."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return _darwin_features() or _torch_features()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86, then ARM
            return frozenset(line.partition(":")[2].split())
    return _torch_features()


def _darwin_features() -> frozenset[str]:
    if platform.system() != "Darwin":
        return frozenset()
    if machine() == "aarch64":
        return frozenset({"asimd"})  # every Apple Silicon core has NEON
    try:
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    names = out.upper().split()
    return frozenset(_DARWIN_NAMES[n] for n in names if n in _DARWIN_NAMES)


def _torch_features() -> frozenset[str]:
    """torch's own reading of the CPU: it tells AVX2 and AVX-512 apart, not VNNI."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return _REQUIRED["avx512"]
    if capability == "AVX2":
        return _REQUIRED["avx2"]
    return frozenset({"asimd"}) if machine() == "aarch64" else frozenset()


def runnable(isa: str) -> bool:
    """Whether this CPU executes `isa`'s build."""
    arch, _ = ISA_FLAGS[isa]
    return arch in (machine(), "any") and _REQUIRED[isa] <= cpu_features()


def runnable_isas() -> list[str]:
    """Every set this CPU executes, best first (the last is always "portable")."""
    return [isa for isa in ISA_FLAGS if runnable(isa)]


def selected_isa() -> str:
    """The set the kernels load: `LADLE_CPU_ISA` when set, else the best this CPU runs."""
    forced = envconfig.cpu_isa()
    if forced is None:
        return runnable_isas()[0]
    if forced not in ISA_FLAGS:
        raise UnsupportedIsaError(
            f"LADLE_CPU_ISA={forced}: unknown instruction set (one of {', '.join(ISA_FLAGS)})"
        )
    if not runnable(forced):
        raise UnsupportedIsaError(
            f"LADLE_CPU_ISA={forced}: this CPU cannot run it (it runs {', '.join(runnable_isas())})"
        )
    return forced


def cpu_name() -> str:
    """The CPU's model name, for benchmark tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
