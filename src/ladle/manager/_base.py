"""What the sync and async managers share, without I/O: service discovery, alias resolution,
request shapes and response checks. `FoundryLocalManager` and `AsyncFoundryLocalManager` only
send the requests, in the same methods and the same order.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from ladle.devices import runnable_device_types
from ladle.errors import DownloadError, ModelNotFoundError, ServiceError
from ladle.manager import service
from ladle.manager._models import ExecutionProvider, FoundryModelInfo
from ladle.manager.service import ServiceState
from ladle.protocol.foundry import FoundryDownloadResult, FoundryStatus

logger = logging.getLogger(__name__)

DEFAULT_TTL = 600
# GPU variants before CPU, as Foundry Local's SDK orders them off Windows.
_PREFERENCE = (
    ExecutionProvider.QNN,
    ExecutionProvider.CUDA,
    ExecutionProvider.WEBGPU,
    ExecutionProvider.CPU,
)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class ServiceCatalog:
    """The service's catalog as fetched once: its variants, indexed by id and by alias."""

    models: tuple[FoundryModelInfo, ...]
    index: dict[str, FoundryModelInfo]

    @classmethod
    def parse(
        cls, entries: list[dict[str, Any]], runnable: Collection[ExecutionProvider]
    ) -> ServiceCatalog:
        """From `GET /foundry/list`. An alias indexes its preferred variant among those this
        machine runs (`runnable`): GPU before CPU, then the highest version."""
        models = tuple(FoundryModelInfo.from_list_response(e) for e in entries)
        index = {m.id.casefold(): m for m in models}
        rank = {provider: i for i, provider in enumerate(_PREFERENCE)}
        by_alias: dict[str, list[FoundryModelInfo]] = {}
        for m in models:
            by_alias.setdefault(m.alias.casefold(), []).append(m)
        for alias, variants in by_alias.items():
            # with no runnable variant, the preferred one still resolves: loading it then
            # fails on the service with its reason
            candidates = [m for m in variants if m.runtime in runnable] or variants
            best = min(candidates, key=lambda m: (rank.get(m.runtime, len(rank)), -_version(m.id)))
            index.setdefault(alias, best)  # an id never gives way to an alias
        return cls(models, index)

    def find(self, alias_or_model_id: str) -> FoundryModelInfo | None:
        """An id (with or without `:version`, then the highest) or an alias; case ignored."""
        key = alias_or_model_id.strip().casefold()
        info = self.index.get(key)
        if info is None and ":" not in key:
            versions = [m for k, m in self.index.items() if k.startswith(f"{key}:")]
            info = max(versions, key=lambda m: _version(m.id), default=None)
        return info

    def get(self, alias_or_model_id: str) -> FoundryModelInfo:
        """Like `find`, but raises `ModelNotFoundError`."""
        info = self.find(alias_or_model_id)
        if info is None:
            raise ModelNotFoundError(alias_or_model_id, "not in the service's catalog")
        return info

    def infos(self, model_ids: Iterable[str]) -> list[FoundryModelInfo]:
        """The catalog models with these ids, in order; ids the catalog lacks are left out."""
        infos = []
        for model_id in model_ids:
            if (info := self.find(model_id)) is not None:
                infos.append(info)
            else:
                logger.debug("model %s is not in the catalog", model_id)
        return infos

    def load_params(self, info: FoundryModelInfo, ttl: int) -> dict[str, Any]:
        """Query parameters of `GET /openai/load/{id}`."""
        params: dict[str, Any] = {"ttl": ttl}
        if info.runtime in (ExecutionProvider.WEBGPU, ExecutionProvider.CUDA):
            # such a variant runs on either provider: CUDA where the catalog offers it
            has_cuda = any(m.runtime is ExecutionProvider.CUDA for m in self.models)
            params["ep"] = (ExecutionProvider.CUDA if has_cuda else info.runtime).get_alias()
        return params


class BaseManager:
    """State and configuration of both managers; no network I/O here."""

    def __init__(self, timeout: float | httpx.Timeout | None) -> None:
        self._timeout = timeout
        self._state: ServiceState | None = service.find()
        self._catalog: ServiceCatalog | None = None

    @property
    def service_uri(self) -> str:
        """Base URL of the running service, e.g. `http://127.0.0.1:52113`."""
        if self._state is None:
            raise ServiceError(
                "no ladle service is running: call start_service() or run `ladle service start`"
            )
        return self._state.uri

    @property
    def endpoint(self) -> str:
        """The OpenAI-compatible base URL (`{service_uri}/v1`), for an OpenAI client."""
        return f"{self.service_uri}/v1"

    @property
    def api_key(self) -> str:
        """The key the service expects; any value works when the service has none."""
        if self._state is not None and self._state.api_key:
            return self._state.api_key
        return os.environ.get("OPENAI_API_KEY") or "OPENAI_API_KEY"

    def refresh_catalog(self) -> None:
        """Forget the catalog fetched so far; the next call asks the service again."""
        self._catalog = None

    def _switch(self, state: ServiceState) -> None:
        self._state = state
        self._catalog = None  # another service may have another catalog

    def _client_options(self) -> dict[str, Any]:
        return {
            "base_url": self.service_uri,
            "timeout": self._timeout,
            "headers": {"Authorization": f"Bearer {self.api_key}"},
        }

    def _unreachable(self, error: httpx.TransportError) -> ServiceError:
        return ServiceError(f"cannot reach the ladle service at {self.service_uri}: {error}")

    def _download_body(self, info: FoundryModelInfo, token: str | None) -> dict[str, Any]:
        return {"model": info.to_download_body(), "token": token, "IgnorePipeReport": True}


class DownloadReader:
    """Reads `POST /openai/download`'s stream: progress lines, then one final JSON line."""

    def __init__(self, info: FoundryModelInfo, progress: ProgressCallback | None) -> None:
        self._info = info
        self._progress = progress
        self._final = ""

    def feed(self, line: str) -> None:
        """Take one line of the stream; progress lines go to the callback as a percentage."""
        if self._final or line.lstrip().startswith("{"):
            self._final += line
        elif self._progress is not None and (match := _PERCENT.search(line)):
            self._progress(min(float(match[1]), 100.0))

    def finish(self) -> FoundryModelInfo:
        """The downloaded model; `DownloadError` if the service reported a failure."""
        try:
            result = FoundryDownloadResult.model_validate_json(self._final)
        except ValidationError as e:
            raise ServiceError(f"the download ended without a result: {self._final!r}") from e
        if not result.success:
            reason = result.error_message or "unknown error"
            raise DownloadError(self._info.id, self._info.uri, reason)
        return self._info


def runnable_providers() -> frozenset[ExecutionProvider]:
    """The execution providers ladle's engine runs here (see `ladle.devices`)."""
    if "GPU" in runnable_device_types():
        return frozenset({ExecutionProvider.CPU, ExecutionProvider.CUDA})
    return frozenset({ExecutionProvider.CPU})


def check(response: httpx.Response) -> None:
    """Raise a ladle error for a failed response (its body must have been read)."""
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = response.text.strip() or response.reason_phrase, None
    request = response.request
    if code == "model_not_found":
        name = request.url.path.rpartition("/")[2]
        raise ModelNotFoundError(name, message.partition(" not found: ")[2] or message)
    raise ServiceError(
        f"{request.method} {request.url.path} failed ({response.status_code}): {message}"
    )


def json_body(response: httpx.Response) -> Any:
    """The JSON of a successful response."""
    check(response)
    try:
        return response.json()
    except ValueError as e:
        raise ServiceError(f"{response.request.url.path} answered without JSON: {e}") from e


def cache_location(response: httpx.Response) -> str:
    """`modelDirPath` of a `GET /openai/status` response."""
    return FoundryStatus.model_validate(json_body(response)).model_dir_path


def _version(model_id: str) -> int:
    """The numeric version after `:` in an id, or -1."""
    _, _, version = model_id.rpartition(":")
    return int(version) if version.isdigit() else -1
