"""Every `LADLE_*` environment variable, read in one place, typed and documented.

    LADLE_HOME          ladle's own folder: user catalogs, registered local models (~/.ladle)
    LADLE_CACHE_DIR     the model cache root ($LADLE_HOME/models)
    LADLE_CATALOG_PATH  extra catalog files or folders of *.json, separated by os.pathsep
    LADLE_HF_ENDPOINT   the Hugging Face hub's base URL (else HF_ENDPOINT, else huggingface.co)
    LADLE_HF_TOKEN      a hub token for gated models (else HF_TOKEN)
    LADLE_API_KEY       the Bearer key the service requires; how `ladle service start` hands
                        it to the process it spawns (never on the command line)
    LADLE_COMPILE       1 compiles text models' steps in the background, 0 never; unset
                        (auto): only models that do not run whole on the native kernels
    LADLE_NATIVE_KERNELS  0 turns off the C++ kernels (default 1)
    LADLE_CPU_ISA       the kernels' instruction set: avx512_vnni, avx512, avx_vnni, avx2, neon
                        or portable (default: the best this CPU runs)

Each is read when asked for, not at import, so a test or a long-running service sees a change.
The `HF_*` fallbacks are the hub's own variables, honoured so an existing setup just works.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
API_KEY_VAR = "LADLE_API_KEY"


def home() -> Path:
    """`LADLE_HOME`, else `~/.ladle`."""
    return _path("LADLE_HOME") or Path.home() / ".ladle"


def cache_dir() -> Path:
    """`LADLE_CACHE_DIR`, else `$LADLE_HOME/models`."""
    return _path("LADLE_CACHE_DIR") or home() / "models"


def catalog_paths() -> list[Path]:
    """`LADLE_CATALOG_PATH` split on `os.pathsep`: catalog files, or folders of `*.json`."""
    raw = os.environ.get("LADLE_CATALOG_PATH", "")
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]


def hf_endpoint() -> str:
    """`LADLE_HF_ENDPOINT`, else `HF_ENDPOINT`, else `https://huggingface.co` (no trailing /)."""
    raw = os.environ.get("LADLE_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT")
    return (raw or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    """`LADLE_HF_TOKEN`, else `HF_TOKEN`, else None."""
    return os.environ.get("LADLE_HF_TOKEN") or os.environ.get("HF_TOKEN") or None


def api_key() -> str | None:
    """`LADLE_API_KEY`, else None (no key required)."""
    return os.environ.get(API_KEY_VAR) or None


def compile_models() -> bool | None:
    """`LADLE_COMPILE`: whether text models compile their step: 0/false/no/off never,
    1/true/yes/on always, unset or `auto` when the native layer kernels cannot run them."""
    raw = os.environ.get("LADLE_COMPILE", "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return False
    return None if raw in ("", "auto") else True


def native_kernels() -> bool:
    """`LADLE_NATIVE_KERNELS`: use the C++ kernels (on unless 0/false/no/off)."""
    raw = os.environ.get("LADLE_NATIVE_KERNELS", "1")
    return raw.strip().lower() not in ("0", "false", "no", "off")


def cpu_isa() -> str | None:
    """`LADLE_CPU_ISA`, lower case, else None (the kernels pick the best the CPU runs)."""
    raw = os.environ.get("LADLE_CPU_ISA", "").strip().lower()
    return raw or None


def _path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw).expanduser() if raw else None
