"""The service's Starlette app: settings, wiring, authentication, and the uvicorn runner.

`create_app` builds one app from `ServerSettings`: a catalog and a cache, the pool of loaded
models, the OpenAI and Foundry routes over them, `/health` and `/metrics`. `serve` binds the
socket first (so port 0 means "any free port" and the real one is known before the first
request), then runs uvicorn until interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ladle.engine.kv_cache import parse_kv_cache_dtype
from ladle.errors import InvalidRequestError, LadleError, ServiceError
from ladle.server.agent_routes import AgentRoutes
from ladle.server.audio_routes import AudioRoutes
from ladle.server.errors import handle_exception, unauthorized
from ladle.server.foundry_routes import FoundryRoutes
from ladle.server.lifecycle import CatalogResolver, ModelPool
from ladle.server.limits import BodyLimit
from ladle.server.metrics import Metrics, RequestMetrics
from ladle.server.openai_routes import OpenAIRoutes
from ladle.server.openapi import Operation, documented, openapi_document
from ladle.server.quant_routes import QuantRoutes
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.tools.mcp import load_mcp_config
from ladle.tools.runtime import DEFAULT_MAX_TOOL_ROUNDS, Toolbox
from ladle.tools.sessions import SessionLimits

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)


class Health(BaseModel):
    """`degraded`: a model's engine died; `failed_models` says which and why (the next
    request for it loads it again)."""

    status: Literal["ok", "degraded"]
    failed_models: dict[str, str]


MB = 1 << 20  # answered without the API key
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How one service runs. `ladle serve` and the manager's service starter build this.

    Args:
        host: interface to bind; loopback unless the user asks otherwise.
        port: TCP port; 0 lets the OS choose one (`serve` reports it).
        api_key: when set, every route but `/health` needs `Authorization: Bearer <key>`.
        cache_dir: the model cache root (None: `LADLE_CACHE_DIR`, else `~/.ladle/models`).
        default_ttl: seconds a loaded model may stay idle before it is unloaded.
        max_loaded_models: models loaded at once, at most.
        memory_budget_mb: estimated memory (file sizes) of all loaded models, at most
            (None: no limit beyond `max_loaded_models`).
        catalog_paths: catalog files or folders read besides the built-in catalog.
        max_num_seqs: sequences each text model decodes together, at most.
        kv_cache_tokens: each text model's KV cache budget in tokens (None: one full context).
        kv_cache_dtype: what each text model's KV cache stores: "f16" (default) or "f32".
        num_threads: CPU threads per model (None: the cores this process may use).
        max_queue: sequences (a request counts its `n`) that may wait for a model beyond the
            `max_num_seqs` it runs; past them a request is refused at once (503,
            `Retry-After`).
        max_body_mb: the largest request body taken (413 past it).
        request_timeout: seconds a completion may take, at most (None: no limit; a request's
            own `timeout` may ask for less); past it, 504, or an error event in a stream.
        stall_timeout: seconds a stream may wait on a client that reads nothing before it is
            cut off and its request aborted.
        mcp_config: an `{"mcpServers": {...}}` JSON file; its servers' tools serve every model.
        sessions_db: the SQLite file sessions and tool files persist in (None: memory only).
        max_sessions, session_ttl, session_max_mb: what the session store keeps (see
            `SessionLimits`; a session idle past `session_ttl` seconds is dropped).
        max_tool_rounds: rounds of server-side tool calls per request, by default.
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    cache_dir: Path | None = None
    default_ttl: float = 600.0
    max_loaded_models: int = 4
    memory_budget_mb: int | None = None
    catalog_paths: tuple[Path, ...] = ()
    max_num_seqs: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_dtype: str = "f16"
    num_threads: int | None = None
    max_queue: int = 64
    max_body_mb: int = 64
    request_timeout: float | None = None
    stall_timeout: float = 30.0
    mcp_config: Path | None = None
    sessions_db: Path | None = None
    max_sessions: int = 1000
    session_ttl: float | None = 30 * 86400.0
    session_max_mb: int = 1024
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"must be in [0, 65535], got {self.port}", "port")
        if self.default_ttl <= 0:
            raise InvalidRequestError(f"must be positive, got {self.default_ttl}", "default_ttl")
        if self.max_loaded_models < 1:
            raise InvalidRequestError(
                f"must be at least 1, got {self.max_loaded_models}", "max_loaded_models"
            )
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise InvalidRequestError(
                f"must be positive, got {self.memory_budget_mb}", "memory_budget_mb"
            )
        if self.max_num_seqs < 1:
            raise InvalidRequestError(
                f"must be at least 1, got {self.max_num_seqs}", "max_num_seqs"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 2:
            raise InvalidRequestError(
                f"must be at least 2, got {self.kv_cache_tokens}", "kv_cache_tokens"
            )
        try:
            parse_kv_cache_dtype(self.kv_cache_dtype)
        except ValueError as e:
            raise InvalidRequestError(str(e), "kv_cache_dtype") from e
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidRequestError(f"must be at least 1, got {self.num_threads}", "num_threads")
        for name in ("request_timeout", "stall_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidRequestError(f"must be positive, got {value}", name)
        if self.max_body_mb < 1:
            raise InvalidRequestError(f"must be at least 1, got {self.max_body_mb}", "max_body_mb")
        if self.max_queue < 0:
            raise InvalidRequestError(f"must be at least 0, got {self.max_queue}", "max_queue")
        if self.max_tool_rounds < 0:
            raise InvalidRequestError(
                f"must be at least 0, got {self.max_tool_rounds}", "max_tool_rounds"
            )
        self.session_limits()  # checks them
        if self.api_key == "":
            raise InvalidRequestError("must not be empty (leave it unset for no key)", "api_key")

    def session_limits(self) -> SessionLimits:
        return SessionLimits(self.max_sessions, self.session_ttl, self.session_max_mb * MB)

    def toolbox(self) -> Toolbox:
        """The service's tools, sessions and files (its MCP servers connect on `start`)."""
        mcp = load_mcp_config(self.mcp_config) if self.mcp_config is not None else None
        return Toolbox(
            mcp=mcp,
            db_path=self.sessions_db,
            session_limits=self.session_limits(),
            max_tool_rounds=self.max_tool_rounds,
        )

    @property
    def url(self) -> str:
        """The base URL clients on this machine use, e.g. `http://127.0.0.1:5273`."""
        host = _LOOPBACK.get(self.host, self.host)  # a wildcard bind is reached on loopback
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def create_app(settings: ServerSettings) -> Starlette:
    """The service as an ASGI app; models load on demand and unload when the app shuts down."""
    cache = ModelCache(settings.cache_dir)

    def catalog() -> Catalog:
        return Catalog.load(extra_paths=settings.catalog_paths)

    catalog()  # a broken catalog file fails now, not at the first request
    toolbox = settings.toolbox()  # as a broken MCP config or session store
    metrics = Metrics()
    pool = ModelPool(
        CatalogResolver(catalog, cache),
        metrics,
        default_ttl=settings.default_ttl,
        max_loaded_models=settings.max_loaded_models,
        memory_budget_mb=settings.memory_budget_mb,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_tokens=settings.kv_cache_tokens,
        kv_cache_dtype=settings.kv_cache_dtype,
        num_threads=settings.num_threads,
        max_queue=settings.max_queue,
        toolbox=toolbox,
    )

    @documented(Operation("Whether the service answers", "Service", returns=Health, errors=()))
    async def health(request: Request) -> Response:
        failed = pool.failures()
        health = Health(status="degraded" if failed else "ok", failed_models=failed)
        return JSONResponse(health.model_dump())

    @documented(Operation("Prometheus metrics", "Service", media_type="text/plain", errors=()))
    async def render_metrics(request: Request) -> Response:
        return PlainTextResponse(
            metrics.render(pool.stats()), media_type="text/plain; version=0.0.4"
        )

    @documented(
        Operation("This document: OpenAPI 3.1", "Service", returns=dict[str, Any], errors=())
    )
    async def openapi(request: Request) -> Response:
        if not document:
            document.update(
                openapi_document(
                    routes,
                    title="ladle",
                    version=importlib.metadata.version("ladle"),
                    secured=settings.api_key is not None,
                )
            )
        return JSONResponse(document)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(toolbox.start)  # connects the MCP servers
        pool.start()
        logger.info("serving on %s (models from %s)", settings.url, cache.root)
        try:
            yield
        finally:
            await pool.aclose()
            await asyncio.to_thread(toolbox.close)

    middleware = [Middleware(RequestMetrics, metrics=metrics)]
    if settings.api_key is not None:
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key))
    middleware.append(Middleware(BodyLimit, limit=settings.max_body_mb * MB))
    document: dict[str, Any] = {}  # built on first request, from the final routes
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *OpenAIRoutes(
            pool, metrics, catalog, cache, settings.request_timeout, settings.stall_timeout
        ).routes(),
        *AudioRoutes(pool, settings.stall_timeout).routes(),
        *FoundryRoutes(settings.url, catalog, cache, pool).routes(),
        *QuantRoutes(pool).routes(),
        *AgentRoutes(toolbox).routes(),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            LadleError: handle_exception,
            HTTPException: handle_exception,
            Exception: handle_exception,
        },
        lifespan=lifespan,
    )
    app.state.pool = pool  # for whoever embeds the app (and the fault tests) to reach the models
    return app


class BearerAuth:
    """ASGI middleware: every path but `OPEN_PATHS` needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):  # constant time
                await unauthorized()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ServiceError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def serve(settings: ServerSettings, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the service in the foreground until Ctrl-C or SIGTERM.

    Args:
        settings: how to run; with `port=0` the OS picks a free port.
        on_ready: called with the base URL once the service accepts requests.
    """
    sock = bind(settings.host, settings.port)
    settings = replace(settings, port=sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings), log_config=None, timeout_graceful_shutdown=5, lifespan="on"
    )
    asyncio.run(_run(uvicorn.Server(config), sock, settings.url, on_ready))


async def _run(
    server: uvicorn.Server,
    sock: socket.socket,
    url: str,
    on_ready: Callable[[str], None] | None,
) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started and on_ready is not None:
        on_ready(url)
    await task
