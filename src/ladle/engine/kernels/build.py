"""Compile the kernel library once per instruction set: `libladle_<isa>.so`.

The sources beside this file use no torch and export a C ABI (`api.h`), so one build serves
every torch and Python version. Each instruction set is the same sources compiled with that
set's flags; `native.py` loads the build that the CPU runs best (`isa.py`). `pip install`
builds every set of the machine's architecture into the package (`setup.py`), so a first
`ladle run` waits for no compiler; a checkout whose builds are missing or older than its
sources builds the one it needs on first use, into the user's cache.

This module imports nothing outside the standard library: `setup.py` runs it before ladle or
torch are installed. `python -m ladle.engine.kernels [--out DIR] [ISA ...]` builds by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = (
    "api.cpp",
    "attention_rows.cpp",
    "decode_attention.cpp",
    "decoder.cpp",
    "prefill_attention.cpp",
    "quant_linear.cpp",
    "row_ops.cpp",
    "thread_pool.cpp",
)
HEADERS = ("api.h", "attention_rows.h", "kernels.h", "simd.h", "simd_emulated.h", "thread_pool.h")
COMPILER = os.environ.get("CXX", "g++")

_COMMON = (
    "-O3",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fno-math-errno",
    "-ffp-contract=off",  # a * b + c stays two roundings unless the code asks for fmadd
    "-fvisibility=hidden",  # only api.h's functions leave the library
    "-fvisibility-inlines-hidden",
)
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c")
_AVX2 = ("-mavx2", "-mfma", "-mf16c")

# Per instruction set: the CPU architecture it runs on, and its compiler flags. Best first.
ISA_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "avx512_vnni": ("x86_64", (*_AVX512, "-mavx512vnni", "-mprefer-vector-width=512")),
    "avx512": ("x86_64", (*_AVX512, "-mprefer-vector-width=512")),
    "avx_vnni": ("x86_64", (*_AVX2, "-mavxvnni")),
    "avx2": ("x86_64", _AVX2),
    "neon": ("aarch64", ("-march=armv8-a",)),
    "portable": ("any", ()),
}
# Tests only: "<isa>-emulated" is `isa`'s path of simd.h compiled for an x86-64 AVX2 machine
# with SIMDe standing in for the intrinsics (`simd_emulated.h`), so that a machine checks the
# paths it cannot execute. SIMDe's fused multiply-adds are fused only with -mfma.
EMULATED = "-emulated"
SIMDE_HEADER = Path("simde/x86/avx512.h")
_INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
_TIMEOUT_S = 600
_ERROR_TAIL_CHARS = 2000


def machine() -> str:
    """This machine's architecture in `ISA_FLAGS`' terms."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def host_isas() -> list[str]:
    """The instruction sets built for this machine's architecture, best first."""
    return [isa for isa, (arch, _) in ISA_FLAGS.items() if arch in (machine(), "any")]


def library_name(isa: str) -> str:
    return f"libladle_{isa}.so"


def flags(isa: str) -> list[str]:
    if isa.endswith(EMULATED):
        emulated = isa.removesuffix(EMULATED)
        defines = [f"-DLADLE_ISA_{emulated.upper()}=1", "-DLADLE_EMULATED=1"]
        common = ["-O1" if flag == "-O3" else flag for flag in _COMMON]  # builds in 2/3 the time
        return [*common, *_AVX2, *defines, f'-DLADLE_ISA_NAME="{isa}"']
    _, isa_flags = ISA_FLAGS[isa]
    return [*_COMMON, *isa_flags, f"-DLADLE_ISA_{isa.upper()}=1", f'-DLADLE_ISA_NAME="{isa}"']


def emulated_isas(runnable: list[str]) -> list[str]:
    """The SIMD sets an x86-64 machine that runs `runnable` (AVX2 among them) can check
    through SIMDe: every one it cannot execute; none without SIMDe's headers."""
    have_simde = any((folder / SIMDE_HEADER).exists() for folder in _INCLUDE_DIRS)
    if machine() != "x86_64" or "avx2" not in runnable or not have_simde:
        return []
    simd = [isa for isa in ISA_FLAGS if isa != "portable"]
    return [isa + EMULATED for isa in simd if isa not in runnable]


def source_hash(isa: str) -> str:
    """What a build of `isa` depends on: the sources, the flags and the compiler's name."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(flags(isa)).encode())
    return digest.hexdigest()[:16]


def build(isa: str, path: Path) -> str | None:
    """Compile `isa`'s library to `path`; None on success, else why it could not.

    The library is written under a temporary name and renamed when complete, so a process
    that builds or loads at the same time never sees a partial file.
    """
    compiler = shutil.which(COMPILER)
    if compiler is None:
        return f"no {COMPILER} on PATH to build them"
    sources = [str(SOURCE_DIR / name) for name in SOURCES]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as work:
            tmp = Path(work) / path.name
            command = [
                compiler,
                *flags(isa),
                f'-DLADLE_SOURCE_HASH="{source_hash(isa)}"',
                *sources,
                "-o",
                str(tmp),
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S)
            if result.returncode != 0:
                output = result.stderr or result.stdout
                return f"the {isa} build failed:\n{output[-_ERROR_TAIL_CHARS:]}"
            os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as exc:  # an unwritable folder, a killed compiler
        return f"the {isa} build failed: {exc}"
    return None


def build_all(out_dir: Path, isas: list[str] | None = None) -> dict[str, str | None]:
    """Build each of `isas` (default: every set of this architecture) into `out_dir`, in
    parallel; the error of each that failed (a compiler too old for AVX-VNNI, say)."""
    chosen = isas or host_isas()
    with ThreadPoolExecutor(max(1, min(len(chosen), os.cpu_count() or 1))) as pool:
        errors = pool.map(lambda isa: build(isa, out_dir / library_name(isa)), chosen)
        return dict(zip(chosen, errors, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("isas", nargs="*", choices=[*ISA_FLAGS, []], metavar="ISA")
    parser.add_argument("--out", type=Path, default=SOURCE_DIR / "lib")
    args = parser.parse_args(argv)
    failed = 0
    for isa, error in build_all(args.out, args.isas or None).items():
        print(f"{isa}: {'built' if error is None else error}", file=sys.stderr)
        failed += error is not None
    return 1 if failed else 0
