"""`FoundryLocalManager`: find or start the local service and drive it over HTTP."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import httpx

from ladle.manager import service
from ladle.manager._base import (
    DEFAULT_TTL,
    BaseManager,
    DownloadReader,
    ProgressCallback,
    ServiceCatalog,
    cache_location,
    check,
    json_body,
    runnable_providers,
)
from ladle.manager._models import FoundryModelInfo
from ladle.manager.service import ServiceState

logger = logging.getLogger(__name__)


class FoundryLocalManager(BaseManager):
    """Manage the local model service and its models, as Foundry Local's Python SDK does.

    Args:
        alias_or_model_id: a model to download and load at once (only with `bootstrap`).
        bootstrap: start the service if none runs (and fetch and load the model, if given).
        timeout: HTTP timeout in seconds for the management calls; None waits as long as
            a call takes (loading a model can take a while).
    """

    def __init__(
        self,
        alias_or_model_id: str | None = None,
        bootstrap: bool = True,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        super().__init__(timeout)
        self._client: httpx.Client | None = None
        if bootstrap:
            self.start_service()
            if alias_or_model_id is not None:
                self.download_model(alias_or_model_id)
                self.load_model(alias_or_model_id)

    def is_service_running(self) -> bool:
        """Whether a service for this user runs and answers; the manager then talks to it."""
        state = service.find()
        if state is None or not service.is_healthy(state):
            return False
        self._use(state)
        return True

    def start_service(self) -> None:
        """Start the service in the background unless one already runs, and wait for it."""
        self._use(service.find() or service.start())

    def list_catalog_models(self) -> list[FoundryModelInfo]:
        """Every model variant in the service's catalog (fetched once; see `refresh_catalog`)."""
        return list(self._fetch_catalog().models)

    def get_model_info(
        self, alias_or_model_id: str, raise_on_not_found: bool = False
    ) -> FoundryModelInfo | None:
        """The model an id names, or the best variant of an alias for this machine.

        An id without `:version` takes its highest version. Returns None when nothing matches,
        or raises `ModelNotFoundError` if `raise_on_not_found`.
        """
        catalog = self._fetch_catalog()
        if raise_on_not_found:
            return catalog.get(alias_or_model_id)
        return catalog.find(alias_or_model_id)

    def get_cache_location(self) -> str:
        """The folder the service keeps downloaded models in."""
        return cache_location(self._request("GET", "/openai/status"))

    def list_cached_models(self) -> list[FoundryModelInfo]:
        """The catalog models that are downloaded."""
        return self._fetch_catalog().infos(self._get("/openai/models"))

    def download_model(
        self,
        alias_or_model_id: str,
        token: str | None = None,
        force: bool = False,
        *,
        progress: ProgressCallback | None = None,
    ) -> FoundryModelInfo:
        """Download a model into the service's cache, unless it is there already.

        Args:
            alias_or_model_id: an alias (the best variant for this machine) or a model id.
            token: a token for sources that need one (gated hub models).
            force: ask the service even if the model is listed as cached (it then checks
                the files and fetches whatever is missing).
            progress: called with the percentage done as the service reports it.

        Raises:
            ModelNotFoundError: the catalog has no such model.
            DownloadError: the service could not download it.
        """
        info = self._fetch_catalog().get(alias_or_model_id)
        if not force and info in self.list_cached_models():
            logger.info("model %s (%s) is already downloaded", info.alias, info.id)
            return info
        reader = DownloadReader(info, progress)
        body = self._download_body(info, token)
        try:
            with self._http.stream("POST", "/openai/download", json=body, timeout=None) as response:
                if not response.is_success:
                    response.read()
                    check(response)
                for line in response.iter_lines():
                    reader.feed(line)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return reader.finish()

    def load_model(self, alias_or_model_id: str, ttl: int = DEFAULT_TTL) -> FoundryModelInfo:
        """Load a downloaded model; it is unloaded after `ttl` idle seconds."""
        catalog = self._fetch_catalog()
        info = catalog.get(alias_or_model_id)
        self._request("GET", f"/openai/load/{info.id}", params=catalog.load_params(info, ttl))
        return info

    def unload_model(self, alias_or_model_id: str, force: bool = False) -> None:
        """Unload a model if it is loaded; `force` ends its requests in flight."""
        info = self._fetch_catalog().get(alias_or_model_id)
        if info not in self.list_loaded_models():
            logger.info("model %s (%s) is not loaded", info.alias, info.id)
            return
        self._request("GET", f"/openai/unload/{info.id}", params={"force": force})

    def list_loaded_models(self) -> list[FoundryModelInfo]:
        """The catalog models loaded in the service."""
        return self._fetch_catalog().infos(self._get("/openai/loadedmodels"))

    def close(self) -> None:
        """Close the HTTP connections (the service keeps running)."""
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> FoundryLocalManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(**self._client_options())
        return self._client

    def _use(self, state: ServiceState) -> None:
        if state != self._state:
            self.close()
            self._client = None
            self._switch(state)

    def _fetch_catalog(self) -> ServiceCatalog:
        if self._catalog is None:
            entries = self._get("/foundry/list")
            self._catalog = ServiceCatalog.parse(entries, runnable_providers())
        return self._catalog

    def _get(self, path: str) -> Any:
        return json_body(self._request("GET", path))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        check(response)
        return response
