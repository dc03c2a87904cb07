"""Foundry Local's v1 management routes, field for field, so its clients work unchanged.

    GET  /foundry/list                 catalog entries (camelCase), a bare JSON array
    GET  /openai/models                ids of the models ready to load (cached or local)
    GET  /openai/loadedmodels          ids of the loaded models
    GET  /openai/load/{id}?ttl=&ep=    load a model (200, empty body)
    GET  /openai/unload/{id}?force=    unload a model (200, empty body)
    POST /openai/download              stream progress lines, then one JSON result line
    GET  /openai/status                endpoints and the model folder

`ttl` follows Foundry: a positive number of seconds, else the service's default; `unload=false`
keeps the model loaded until it is unloaded. Failures are OpenAI error bodies, except those of
a download that has started: they arrive in its last line, `{"success": false, ...}`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from pathlib import Path

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.errors import InvalidRequestError
from ladle.protocol.foundry import (
    FoundryDownloadRequest,
    FoundryDownloadResult,
    FoundryListEntry,
    FoundryModelSettings,
    FoundryRuntime,
    FoundryStatus,
)
from ladle.protocol.openai import parse_body
from ladle.server.errors import to_error
from ladle.server.lifecycle import ModelPool
from ladle.server.openai_routes import ClosingStreamingResponse
from ladle.server.openapi import Operation, Query, documented
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.store.download import DownloadProgress, download_model
from ladle.store.entry import CatalogEntry

EXECUTION_PROVIDERS = ("cpu",)  # what `ep=` may ask for: the engine runs on the CPU
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
TAG = "Foundry Local"
FLAG = {"type": "string", "enum": [*_TRUE, *_FALSE]}


class FoundryRoutes:
    """The management routes over a catalog, a cache and the pool of loaded models.

    Args:
        endpoint: the service's base URL, reported by `/openai/status`.
        catalog: reads the catalog afresh, so models added while the service runs appear.
    """

    def __init__(
        self, endpoint: str, catalog: Callable[[], Catalog], cache: ModelCache, pool: ModelPool
    ) -> None:
        self.endpoint = endpoint
        self.catalog = catalog
        self.cache = cache
        self.pool = pool

    def routes(self) -> list[Route]:
        return [
            Route("/foundry/list", self.list_catalog, methods=["GET"]),
            Route("/openai/models", self.cached_models, methods=["GET"]),
            Route("/openai/loadedmodels", self.loaded_models, methods=["GET"]),
            Route("/openai/load/{model_id:path}", self.load, methods=["GET"]),
            Route("/openai/unload/{model_id:path}", self.unload, methods=["GET"]),
            Route("/openai/download", self.download, methods=["POST"]),
            Route("/openai/status", self.status, methods=["GET"]),
        ]

    @documented(Operation("The catalog's entries", TAG, returns=list[FoundryListEntry]))
    async def list_catalog(self, request: Request) -> Response:
        entries = [to_list_entry(e).model_dump(by_alias=True) for e in self.catalog().entries()]
        return _json(entries)

    @documented(Operation("Ids of the models ready to load", TAG, returns=list[str], errors=()))
    async def cached_models(self, request: Request) -> Response:
        return _json([e.id for e in self.catalog().entries() if self.cache.is_cached(e)])

    @documented(Operation("Ids of the loaded models", TAG, returns=list[str], errors=()))
    async def loaded_models(self, request: Request) -> Response:
        return _json(self.pool.loaded_ids())

    @documented(
        Operation(
            "Load a model (an empty 200 once loaded)",
            TAG,
            query=(
                Query("ttl", {"type": "integer", "minimum": 0}, "idle seconds before it unloads"),
                Query("unload", FLAG, "false: keep it until it is unloaded"),
                Query("ep", {"type": "string", "pattern": "^([cC][pP][uU])?$"}, "cpu"),
            ),
            errors=(400, 404, 503),
        )
    )
    async def load(self, request: Request) -> Response:
        query = request.query_params
        ep = query.get("ep") or None
        if ep is not None and ep.lower() not in EXECUTION_PROVIDERS:
            raise InvalidRequestError(
                f"execution provider {ep!r} is not available here "
                f"(ladle runs models on: {', '.join(EXECUTION_PROVIDERS)})",
                param="ep",
            )
        await self.pool.load(request.path_params["model_id"], self._ttl(query))
        return Response(status_code=200)

    @documented(
        Operation(
            "Unload a model (an empty 200)",
            TAG,
            query=(Query("force", FLAG, "end its requests in flight"),),
            errors=(400, 404, 409),
        )
    )
    async def unload(self, request: Request) -> Response:
        force = _flag(request.query_params, "force", default=False)
        await self.pool.unload(request.path_params["model_id"], force=force)
        return Response(status_code=200)

    @documented(
        Operation(
            "Download a model: progress lines, then one JSON result line",
            TAG,
            body=FoundryDownloadRequest,
            media_type="text/plain",
            errors=(400, 404),
        )
    )
    async def download(self, request: Request) -> Response:
        body = parse_body(FoundryDownloadRequest, await request.body())
        entry = self.catalog().get(body.model.name, cached_ids=self.cache.cached_ids())
        lines = self._download_lines(entry, body.token)
        return ClosingStreamingResponse(lines, media_type="text/plain; charset=utf-8")

    @documented(Operation("Endpoints and the model folder", TAG, returns=FoundryStatus, errors=()))
    async def status(self, request: Request) -> Response:
        status = FoundryStatus(endpoints=[self.endpoint], model_dir_path=str(self.cache.root))
        return _json(status.model_dump(by_alias=True))

    def _ttl(self, query: QueryParams) -> float | None:
        if not _flag(query, "unload", default=True):
            return None
        raw = query.get("ttl")
        try:
            ttl = int(raw) if raw else 0
        except ValueError as e:
            raise InvalidRequestError(f"expected whole seconds, got {raw!r}", "ttl") from e
        if ttl < 0:
            raise InvalidRequestError(f"must not be negative, got {ttl}", "ttl")
        return ttl or self.pool.default_ttl

    async def _download_lines(
        self, entry: CatalogEntry, token: str | None
    ) -> AsyncGenerator[bytes | str, None]:
        """`Total 42.5% Downloading model.gguf` per progress step, then the JSON result.

        The download runs on a worker thread; a client that hangs up cancels it.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DownloadProgress | None] = asyncio.Queue()
        cancel = threading.Event()

        def report(progress: DownloadProgress) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, progress)

        job: Future[Path] = Future()

        def run() -> None:
            try:
                job.set_result(
                    download_model(entry, self.cache, token=token, progress=report, cancel=cancel)
                )
            except BaseException as e:  # handed to the awaiting handler, not swallowed
                job.set_exception(e)
            finally:
                loop.call_soon_threadsafe(updates.put_nowait, None)

        threading.Thread(target=run, name="ladle-download", daemon=True).start()
        try:
            last = ""
            while (progress := await updates.get()) is not None:
                line = _progress_line(progress)
                if line != last:
                    yield line
                    last = line
            await asyncio.wrap_future(job)
            result = FoundryDownloadResult(success=True)
        except Exception as e:
            _, body = to_error(e)
            result = FoundryDownloadResult(success=False, error_message=body.error.message)
        finally:
            cancel.set()  # a no-op once the download is done; stops it if the client left
        yield result.model_dump_json(by_alias=True) + "\n"


def to_list_entry(entry: CatalogEntry) -> FoundryListEntry:
    """A catalog entry as `/foundry/list` shows it."""
    return FoundryListEntry(
        name=entry.id,
        display_name=entry.display_name,
        alias=entry.alias,
        version=str(entry.version),
        uri=entry.uri,
        provider_type=entry.provider_type,
        model_type=entry.format.upper(),
        prompt_template=entry.prompt_template,
        publisher=entry.publisher,
        task=entry.task,
        license=entry.license,
        license_description=entry.license_description,
        parent_model_uri=entry.parent_model_uri,
        runtime=FoundryRuntime(
            device_type=entry.device_type, execution_provider=entry.execution_provider
        ),
        file_size_mb=entry.file_size_mb,
        model_settings=FoundryModelSettings.model_validate(entry.model_settings),
        supports_tool_calling=entry.supports_tool_calling,
        max_output_tokens=entry.max_output_tokens,
    )


def _progress_line(progress: DownloadProgress) -> str:
    """`Total 42.5% Downloading model.gguf`, or `Total 12.3 MB ...` while the size is unknown."""
    done = (
        f"{progress.downloaded / 2**20:.1f} MB"
        if progress.percent is None
        else f"{progress.percent:.1f}%"
    )
    return f"Total {done} Downloading {progress.file_name}\n"


def _flag(query: QueryParams, name: str, *, default: bool) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise InvalidRequestError(f"expected true or false, got {raw!r}", param=name)


def _json(data: object) -> Response:
    return Response(json.dumps(data), media_type="application/json")
