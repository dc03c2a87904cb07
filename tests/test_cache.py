"""The model cache: a folder per id, the completion marker, list / remove / verify, the root."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from ladle.store.cache import MARKER, ModelCache
from ladle.store.download import download_model
from ladle.store.entry import CatalogEntry


def local_source_entry(
    folder: Path, files: dict[str, bytes], model_id: str = "tiny-generic-cpu:1"
) -> CatalogEntry:
    """An entry whose files come from `file://` sources written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    raw_files = []
    for name, data in files.items():
        src = folder / name.replace("/", "_")
        src.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        raw_files.append({"name": name, "size": len(data), "sha256": sha, "source": src.as_uri()})
    fmt = "gguf" if any(n.endswith(".gguf") for n in files) else "safetensors"
    raw = {"id": model_id, "alias": "tiny", "format": fmt, "files": raw_files}
    return CatalogEntry.from_json(raw, "test")


def test_entry_dir_is_one_safe_folder_per_id(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    default = "smollm2-135m-instruct-q4_1-generic-cpu:1"
    assert cache.entry_dir(default) == tmp_path / "smollm2-135m-instruct-q4_1-generic-cpu--1"
    for odd in ("a/b:2", "..", ".locks", "", "C:\\x y"):
        folder = cache.entry_dir(odd)
        assert folder.parent == tmp_path and not folder.name.startswith(".")
    assert cache.entry_dir("a/b:2").name == "a_b--2"


def test_root_comes_from_the_argument_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LADLE_CACHE_DIR", raising=False)
    monkeypatch.delenv("LADLE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelCache().root == tmp_path / ".ladle" / "models"
    monkeypatch.setenv("LADLE_HOME", str(tmp_path / "home"))
    assert ModelCache().root == tmp_path / "home" / "models"
    monkeypatch.setenv("LADLE_CACHE_DIR", str(tmp_path / "env"))
    assert ModelCache().root == tmp_path / "env"
    assert ModelCache(tmp_path / "flag").root == tmp_path / "flag"


def test_list_location_and_remove(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    chat = local_source_entry(tmp_path / "a", {"m.gguf": b"x" * 1000}, "chat-generic-cpu:1")
    embed = local_source_entry(
        tmp_path / "b", {"config.json": b"{}", "model.safetensors": b"y" * 500}, "embed-cpu:2"
    )
    assert cache.list() == []
    assert download_model(chat, cache) == cache.model_path(chat) == cache.entry_dir(chat) / "m.gguf"
    assert download_model(embed, cache) == cache.model_path(embed) == cache.entry_dir(embed)

    listed = cache.list()
    assert [m.id for m in listed] == ["chat-generic-cpu:1", "embed-cpu:2"]
    assert [m.path for m in listed] == [cache.entry_dir(chat), cache.entry_dir(embed)]
    assert listed[0].size_bytes >= 1000 and listed[1].size_bytes >= 502
    assert cache.cached_ids() == {"chat-generic-cpu:1", "embed-cpu:2"}

    assert cache.remove("chat-generic-cpu:1")
    assert not cache.is_cached(chat) and not cache.entry_dir(chat).exists()
    assert not cache.remove("chat-generic-cpu:1")
    assert [m.id for m in cache.list()] == ["embed-cpu:2"]


def test_a_folder_without_the_marker_is_not_a_cached_model(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    entry = local_source_entry(tmp_path / "src", {"m.gguf": b"abc"})
    folder = cache.entry_dir(entry)
    folder.mkdir(parents=True)
    (folder / "m.gguf").write_bytes(b"abc")  # every byte there, but never marked complete
    assert not cache.is_cached(entry)
    assert cache.list() == []
    assert cache.verify(entry) == [f"{entry.id}: not completely downloaded"]
    cache.mark_complete(entry)
    assert cache.is_cached(entry) and cache.verify(entry) == []
    (folder / "m.gguf").write_bytes(b"ab")
    assert not cache.is_cached(entry)  # a file of the wrong size is noticed without hashing
    (folder / MARKER).write_text("{not json")
    assert cache.list() == []


def test_verify_reports_missing_resized_and_corrupted_files(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    files = {"a.gguf": b"a" * 100, "b.json": b"b" * 10, "c/d.txt": b"d" * 5}
    entry = local_source_entry(tmp_path / "src", files)
    download_model(entry, cache)
    assert cache.verify(entry) == []
    folder = cache.entry_dir(entry)
    (folder / "a.gguf").write_bytes(b"a" * 99 + b"X")
    (folder / "b.json").write_bytes(b"b" * 11)
    (folder / "c" / "d.txt").unlink()
    problems = cache.verify(entry)
    assert problems[0].startswith("a.gguf: sha256 ") and "expected " in problems[0]
    assert problems[1:] == ["b.json: 11 bytes, expected 10", "c/d.txt: missing"]


def test_remove_waits_for_a_download_of_the_same_model(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    entry = local_source_entry(tmp_path / "src", {"m.gguf": b"abc"})
    download_model(entry, cache)
    lock = cache.lock(entry)
    lock.acquire()  # as a download holds it
    remover = threading.Thread(target=cache.remove, args=(entry.id,))
    remover.start()
    remover.join(0.3)
    assert remover.is_alive() and cache.entry_dir(entry).exists()
    lock.release()
    remover.join(10)
    assert not cache.entry_dir(entry).exists()


@pytest.mark.parametrize("hostile", ["../outside", "/etc", "..", "a/../../outside", "~root"])
def test_remove_never_reaches_outside_the_cache(tmp_path: Path, hostile: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    cache = ModelCache(tmp_path / "cache")
    assert cache.entry_dir(hostile).parent == cache.root
    assert not cache.remove(hostile)
    assert (outside / "keep.txt").read_text() == "mine"


def test_remove_of_a_linked_folder_drops_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.gguf").write_bytes(b"weights the user keeps elsewhere")
    cache = ModelCache(tmp_path / "cache")
    cache.root.mkdir()
    cache.entry_dir("linked-cpu:1").symlink_to(target, target_is_directory=True)
    assert cache.remove("linked-cpu:1")
    assert not cache.entry_dir("linked-cpu:1").exists()
    assert (target / "keep.gguf").read_bytes() == b"weights the user keeps elsewhere"
