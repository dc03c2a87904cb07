"""Builds the native kernels at install time, one library per instruction set.

Everything else about the package is in pyproject.toml. `build_ext` compiles
`src/ladle/engine/kernels/*.cpp` once per instruction set of this machine's architecture
(`kernels/build.py`: AVX-512 VNNI, AVX-512, AVX-VNNI, AVX2 and portable on x86-64; NEON and
portable on ARM64) into `ladle/engine/kernels/lib/`, so that the first model load finds them
and waits for no compiler. The sources use no torch, so the libraries serve any torch. A set
that fails to build (no compiler, one too old for an instruction set) is a warning: ladle then
builds what it needs on first use, or runs on torch's kernels.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNELS = "ladle/engine/kernels"


def _kernel_build():  # type: ignore[no-untyped-def]
    """kernels/build.py, loaded by path: ladle and torch are not installed yet."""
    spec = importlib.util.spec_from_file_location("ladle_kernel_build", ROOT / "src" / KERNELS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look modules up by name
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """Compiles the kernel libraries instead of Python extension modules."""

    def run(self) -> None:
        kernel_build = _kernel_build()
        out = self._lib_dir()
        for isa, error in kernel_build.build_all(out).items():
            if error is None:
                print(f"ladle: built the {isa} kernels into {out}")
            else:
                print(f"ladle: WARNING: {error}", file=sys.stderr)

    def _lib_dir(self) -> Path:
        base = ROOT / "src" if self.inplace or self.editable_mode else Path(self.build_lib)
        return base / KERNELS / "lib"

    def get_outputs(self) -> list[str]:
        kernel_build = _kernel_build()
        out = self._lib_dir()
        return [str(out / kernel_build.library_name(isa)) for isa in kernel_build.host_isas()]

    def get_output_mapping(self) -> dict[str, str]:
        return {}


setup(
    # One placeholder "extension" makes setuptools run build_ext, and marks the wheel as
    # holding binaries for this platform (they are plain shared libraries, loaded by ctypes).
    ext_modules=[Extension(f"{KERNELS.replace('/', '.')}.lib._placeholder", sources=[])],
    cmdclass={"build_ext": BuildKernels},
)
