"""`AsyncFoundryLocalManager`: `FoundryLocalManager`'s asyncio twin, method for method."""

from __future__ import annotations

import asyncio
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


class AsyncFoundryLocalManager(BaseManager):
    """Manage the local model service and its models from asyncio.

    The constructor does no I/O: it finds a running service, if any. `await
    AsyncFoundryLocalManager.create(alias)` does what `FoundryLocalManager(alias)` does.

    Args:
        timeout: HTTP timeout in seconds for the management calls; None waits as long as
            a call takes (loading a model can take a while).
    """

    def __init__(self, timeout: float | httpx.Timeout | None = None) -> None:
        super().__init__(timeout)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    async def create(
        cls,
        alias_or_model_id: str | None = None,
        bootstrap: bool = True,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncFoundryLocalManager:
        """A manager; with `bootstrap`, the service started and the model downloaded and loaded.

        Args:
            alias_or_model_id: a model to download and load at once (only with `bootstrap`).
            bootstrap: start the service if none runs (and fetch and load the model, if given).
            timeout: as for the constructor.
        """
        manager = cls(timeout)
        if bootstrap:
            await manager.start_service()
            if alias_or_model_id is not None:
                await manager.download_model(alias_or_model_id)
                await manager.load_model(alias_or_model_id)
        return manager

    async def is_service_running(self) -> bool:
        """Whether a service for this user runs and answers; the manager then talks to it."""
        state = await asyncio.to_thread(service.find)
        if state is None or not await _is_healthy(state):
            return False
        await self._use(state)
        return True

    async def start_service(self) -> None:
        """Start the service in the background unless one already runs, and wait for it."""
        state = await asyncio.to_thread(service.find)
        await self._use(state if state is not None else await asyncio.to_thread(service.start))

    async def list_catalog_models(self) -> list[FoundryModelInfo]:
        """Every model variant in the service's catalog (fetched once; see `refresh_catalog`)."""
        return list((await self._fetch_catalog()).models)

    async def get_model_info(
        self, alias_or_model_id: str, raise_on_not_found: bool = False
    ) -> FoundryModelInfo | None:
        """The model an id names, or the best variant of an alias for this machine.

        An id without `:version` takes its highest version. Returns None when nothing matches,
        or raises `ModelNotFoundError` if `raise_on_not_found`.
        """
        catalog = await self._fetch_catalog()
        if raise_on_not_found:
            return catalog.get(alias_or_model_id)
        return catalog.find(alias_or_model_id)

    async def get_cache_location(self) -> str:
        """The folder the service keeps downloaded models in."""
        return cache_location(await self._request("GET", "/openai/status"))

    async def list_cached_models(self) -> list[FoundryModelInfo]:
        """The catalog models that are downloaded."""
        return (await self._fetch_catalog()).infos(await self._get("/openai/models"))

    async def download_model(
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
        info = (await self._fetch_catalog()).get(alias_or_model_id)
        if not force and info in await self.list_cached_models():
            logger.info("model %s (%s) is already downloaded", info.alias, info.id)
            return info
        reader = DownloadReader(info, progress)
        body = self._download_body(info, token)
        try:
            async with self._http.stream(
                "POST", "/openai/download", json=body, timeout=None
            ) as response:
                if not response.is_success:
                    await response.aread()
                    check(response)
                async for line in response.aiter_lines():
                    reader.feed(line)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return reader.finish()

    async def load_model(self, alias_or_model_id: str, ttl: int = DEFAULT_TTL) -> FoundryModelInfo:
        """Load a downloaded model; it is unloaded after `ttl` idle seconds."""
        catalog = await self._fetch_catalog()
        info = catalog.get(alias_or_model_id)
        await self._request("GET", f"/openai/load/{info.id}", params=catalog.load_params(info, ttl))
        return info

    async def unload_model(self, alias_or_model_id: str, force: bool = False) -> None:
        """Unload a model if it is loaded; `force` ends its requests in flight."""
        info = (await self._fetch_catalog()).get(alias_or_model_id)
        if info not in await self.list_loaded_models():
            logger.info("model %s (%s) is not loaded", info.alias, info.id)
            return
        await self._request("GET", f"/openai/unload/{info.id}", params={"force": force})

    async def list_loaded_models(self) -> list[FoundryModelInfo]:
        """The catalog models loaded in the service."""
        return (await self._fetch_catalog()).infos(await self._get("/openai/loadedmodels"))

    async def aclose(self) -> None:
        """Close the HTTP connections (the service keeps running)."""
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncFoundryLocalManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(**self._client_options())
        return self._client

    async def _use(self, state: ServiceState) -> None:
        if state != self._state:
            await self.aclose()
            self._client = None
            self._switch(state)

    async def _fetch_catalog(self) -> ServiceCatalog:
        if self._catalog is None:
            entries = await self._get("/foundry/list")
            self._catalog = ServiceCatalog.parse(entries, runnable_providers())
        return self._catalog

    async def _get(self, path: str) -> Any:
        return json_body(await self._request("GET", path))

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        check(response)
        return response


async def _is_healthy(state: ServiceState) -> bool:
    async with httpx.AsyncClient(timeout=2.0) as client:
        try:
            return (await client.get(f"{state.uri}/health")).status_code == 200
        except httpx.HTTPError:
            return False
