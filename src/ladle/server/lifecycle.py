"""Which models are loaded: load on demand, unload after a time-to-live, evict within a budget.

Rules, as `ModelPool` applies them:
- A request names a model by id or alias; a cached model that is not loaded is loaded first.
  Concurrent first requests share one load.
- Each loaded model has a TTL (the service default, or `?ttl=` on `/openai/load`); a background
  task unloads a model once it has been idle (no request in flight) for that long.
- Loading stays within `max_loaded_models` and `memory_budget_mb` (a model's memory is
  estimated from its file size): the least recently used idle models are unloaded first. If
  only busy models stand in the way, the load fails with `CapacityError` (503) rather than
  waiting, so no request hangs on another's stream.
- A model takes `max_num_seqs` sequences running and `max_queue` waiting (a request with
  `n` choices counts `n`); past that, a new request gets `OverloadedError` (503 with
  `Retry-After`) at once, so overload costs a retry, not memory. An idle model takes any one
  request, so a request larger than the bound runs alone rather than never.
- A model whose engine thread died (`engine_failure`) is unloaded by the next request for it
  and loaded afresh; until then `failures()` (and `/health`) name it with the reason.
- `unload(force=True)` closes the model at once: its requests in flight end with
  `EngineClosedError`, which streams report as an error event. Without `force`, unloading a
  model with requests in flight is refused with `ModelBusyError` (409) and the model stays;
  the caller can retry when they finish or force it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ladle.builders import (
    EmbeddingModelBuilder,
    SpeechModelBuilder,
    TextModelBuilder,
    TranscriptionModelBuilder,
)
from ladle.engine.embedding_loader import is_embedding_model
from ladle.engine.speech import is_voice
from ladle.engine.transcriber import is_whisper
from ladle.errors import ModelNotFoundError
from ladle.model import AsyncModel
from ladle.server.errors import CapacityError, ModelBusyError, OverloadedError
from ladle.server.metrics import LoadedModelStats, Metrics
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.tools.runtime import Toolbox

logger = logging.getLogger(__name__)

AnyBuilder = (
    TextModelBuilder | EmbeddingModelBuilder | SpeechModelBuilder | TranscriptionModelBuilder
)
MB = 1 << 20
TTL_CHECK_INTERVAL = 1.0  # seconds between looks for models idle past their TTL


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model the service can load: its id, the path the engine reads, its size on disk, and
    its catalog task (which builder loads it)."""

    model_id: str
    path: Path
    size_bytes: int
    task: str = "chat-completion"

    def kind(self) -> str:
        """Its task, by the catalog's word, or for a local path, by what the files hold."""
        if self.task != "chat-completion":
            return self.task
        if is_embedding_model(self.path):
            return "embeddings"
        if is_voice(self.path):
            return "text-to-speech"
        if is_whisper(self.path):
            return "automatic-speech-recognition"
        return self.task


class CatalogResolver:
    """Names to loadable models: an alias or id of a catalog entry whose files are in the cache,
    or of a registered local model. The catalog is read afresh each time (it is small), so
    entries added while the service runs are found."""

    def __init__(self, catalog: Callable[[], Catalog], cache: ModelCache) -> None:
        self.catalog = catalog
        self.cache = cache

    def __call__(self, name: str) -> ModelSource:
        entry = self.catalog().get(name, cached_ids=self.cache.cached_ids())
        if not self.cache.is_cached(entry):
            raise ModelNotFoundError(
                name,
                f"{entry.id} is in the catalog but not downloaded; download it first "
                "(No OpenAIService provider found for modelName)",  # what Foundry's SDK matches
            )
        path = self.cache.model_path(entry)
        return ModelSource(entry.id, path, _disk_size(path), entry.task)


@dataclass(eq=False, slots=True)
class Resident:
    """A loaded model and what the pool tracks about it."""

    model_id: str
    model: AsyncModel
    size_bytes: int
    ttl: float | None  # idle seconds before unloading; None keeps it loaded
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # requests in flight
    sequences: int = 0  # the sequences they asked for (`n` each)

    def is_expired(self, now: float) -> bool:
        return self.active == 0 and self.ttl is not None and now - self.last_used >= self.ttl


class Lease:
    """One request's hold on a loaded model; while held, the model is not evicted or expired."""

    def __init__(self, resident: Resident, sequences: int = 1) -> None:
        self.resident = resident
        self.model = resident.model
        self.sequences = sequences
        self._held = True
        resident.active += 1
        resident.sequences += sequences
        resident.last_used = time.monotonic()

    def release(self) -> None:
        """Give the model back (idempotent: streams release early, then again in `finally`)."""
        if self._held:
            self._held = False
            self.resident.active -= 1
            self.resident.sequences -= self.sequences
            self.resident.last_used = time.monotonic()


class ModelPool:
    """The loaded models of one service.

    Args:
        resolve: maps a requested name to a `ModelSource`; raises `ModelNotFoundError`.
        metrics: where load times are recorded.
        default_ttl: seconds a model loaded on demand may stay idle.
        max_loaded_models: how many models may be loaded at once.
        memory_budget_mb: estimated memory all loaded models may use together (None: no limit).
        max_num_seqs, kv_cache_tokens, kv_cache_dtype: each text model's engine settings (see
            the builders; None: the builders' default).
        num_threads: CPU threads per model (None: the builders' default).
        max_queue: sequences (a request counts its `n`) that may wait for a model beyond the
            `max_num_seqs` it runs.
        toolbox: server-side tools, sessions and files, shared by every model loaded.
    """

    def __init__(
        self,
        resolve: Callable[[str], ModelSource],
        metrics: Metrics,
        *,
        default_ttl: float,
        max_loaded_models: int,
        memory_budget_mb: int | None,
        max_num_seqs: int = 16,
        kv_cache_tokens: int | None = None,
        kv_cache_dtype: str | None = None,
        num_threads: int | None = None,
        max_queue: int = 64,
        toolbox: Toolbox | None = None,
    ) -> None:
        self._resolve = resolve
        self._metrics = metrics
        self.default_ttl = default_ttl
        self._max_models = max_loaded_models
        self._budget = None if memory_budget_mb is None else memory_budget_mb * MB
        self._max_num_seqs = max_num_seqs
        self._kv_cache_tokens = kv_cache_tokens
        self._kv_cache_dtype = kv_cache_dtype
        self._num_threads = num_threads
        self._toolbox = toolbox
        self._max_active = max_num_seqs + max_queue  # sequences in flight on one model, at most
        self._failed: dict[str, str] = {}  # model id -> why its engine died, until reloaded
        self._loaded: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Task[Resident]] = {}
        self._reserved: dict[str, int] = {}  # bytes of loads in progress
        self._lock = asyncio.Lock()  # capacity decisions and unloads, one at a time
        self._expiry: asyncio.Task[None] | None = None

    # ---- lifetime of the pool

    def start(self) -> None:
        self._expiry = asyncio.create_task(self._expire_loop(), name="ladle-ttl")

    async def aclose(self) -> None:
        """Stop the TTL task and unload every model."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        async with self._lock:
            for resident in list(self._loaded.values()):
                await self._close(resident)

    # ---- queries

    def loaded_ids(self) -> list[str]:
        return list(self._loaded)

    def residents(self) -> list[Resident]:
        return list(self._loaded.values())

    def failures(self) -> dict[str, str]:
        """Models whose engine died, and why: those found dead now, and those unloaded for it
        and not loaded again since."""
        for r in self.residents():
            reason = r.model.engine_failure()
            if reason is not None:
                self._failed[r.model_id] = reason
        return dict(self._failed)

    def stats(self) -> list[LoadedModelStats]:
        return [
            LoadedModelStats(r.model_id, r.size_bytes, r.active, r.model.engine_stats())
            for r in self.residents()
        ]

    # ---- requests

    async def acquire(self, name: str, sequences: int = 1) -> Lease:
        """Hold the model `name` names, loading it first if needed (or again, if it died), for
        a request of `sequences` sequences (its `n`)."""
        while True:
            resident = self._loaded.get(name)
            if resident is None:
                resident = await self._ensure_loaded(self._resolve(name), self.default_ttl)
            reason = resident.model.engine_failure()
            if reason is not None:
                await self._discard(resident, reason)
                continue
            if self._loaded.get(resident.model_id) is resident:  # not evicted meanwhile
                held = resident.sequences
                if held and held + sequences > self._max_active:
                    waiting = self._max_active - self._max_num_seqs
                    raise OverloadedError(
                        f"model {resident.model_id!r} has {held} sequences in flight; "
                        f"{sequences} more would pass its limit ({waiting} waiting beside "
                        f"{self._max_num_seqs} running); retry shortly"
                    )
                return Lease(resident, sequences)

    @contextlib.asynccontextmanager
    async def use(self, name: str, sequences: int = 1) -> AsyncIterator[AsyncModel]:
        """`async with pool.use(name) as model:` for a request that returns one response."""
        lease = await self.acquire(name, sequences)
        try:
            yield lease.model
        finally:
            lease.release()

    # ---- management

    async def load(self, name: str, ttl: float | None) -> Resident:
        """Load `name` (if needed) and set its TTL; `ttl=None` keeps it loaded until unloaded."""
        source = self._resolve(name)
        resident = self._loaded.get(source.model_id)
        if resident is None:
            resident = await self._ensure_loaded(source, ttl)
        resident.ttl = ttl
        resident.last_used = time.monotonic()
        return resident

    async def unload(self, name: str, *, force: bool) -> bool:
        """Unload `name`; False if it was not loaded. See the module docstring for `force`."""
        model_id = name if name in self._loaded else self._resolve(name).model_id
        async with self._lock:
            resident = self._loaded.get(model_id)
            if resident is None:
                return False
            if resident.active and not force:
                raise ModelBusyError(
                    f"model {model_id!r} has {resident.active} request(s) in flight; "
                    "retry when they finish, or unload with force=true to end them"
                )
            await self._close(resident)
            return True

    # ---- internals

    async def _ensure_loaded(self, source: ModelSource, ttl: float | None) -> Resident:
        resident = self._loaded.get(source.model_id)
        if resident is not None:
            return resident
        task = self._loading.get(source.model_id)
        if task is None:
            task = asyncio.create_task(self._load(source, ttl), name=f"load {source.model_id}")
            self._loading[source.model_id] = task
            task.add_done_callback(lambda _: self._loading.pop(source.model_id, None))
        return await asyncio.shield(task)  # a caller that goes away does not cancel the load

    async def _load(self, source: ModelSource, ttl: float | None) -> Resident:
        async with self._lock:
            await self._make_room(source)
            self._reserved[source.model_id] = source.size_bytes
        try:
            logger.info("loading %s from %s", source.model_id, source.path)
            started = time.perf_counter()
            model = await self._builder(source).with_model_id(source.model_id).build_async()
            seconds = time.perf_counter() - started
            logger.info("loaded %s in %.1fs", source.model_id, seconds)
            self._metrics.observe_load(source.model_id, seconds)
        finally:
            del self._reserved[source.model_id]
        resident = Resident(source.model_id, model, source.size_bytes, ttl)
        self._loaded[source.model_id] = resident
        self._failed.pop(source.model_id, None)
        return resident

    def _builder(self, source: ModelSource) -> AnyBuilder:
        """The builder for `source`'s kind, with the service's settings."""
        kind = source.kind()
        builder: AnyBuilder
        if kind == "text-to-speech":
            builder = SpeechModelBuilder(source.path)
        elif kind == "automatic-speech-recognition":
            builder = TranscriptionModelBuilder(source.path)
        elif kind == "embeddings":
            builder = EmbeddingModelBuilder(source.path)
        else:
            builder = TextModelBuilder(source.path).with_max_num_seqs(self._max_num_seqs)
            if self._kv_cache_tokens is not None:
                builder = builder.with_kv_cache_tokens(self._kv_cache_tokens)
            if self._kv_cache_dtype is not None:
                builder = builder.with_kv_cache_dtype(self._kv_cache_dtype)
        if self._num_threads is not None:
            builder = builder.with_num_threads(self._num_threads)
        # tools serve text models; voices and recognizers have none
        if self._toolbox is not None and isinstance(
            builder, TextModelBuilder | EmbeddingModelBuilder
        ):
            builder = builder.with_toolbox(self._toolbox)
        return builder

    async def _make_room(self, source: ModelSource) -> None:
        """Unload idle models, least recently used first, until `source` fits."""
        need = source.size_bytes
        if self._budget is not None and need > self._budget:
            raise CapacityError(
                f"model {source.model_id!r} needs about {need // MB} MB, more than the "
                f"service's memory budget of {self._budget // MB} MB (memory_budget_mb)"
            )
        while not self._fits(need):
            idle = [r for r in self._loaded.values() if r.active == 0]
            if not idle:
                raise CapacityError(
                    f"cannot load {source.model_id!r}: the loaded models are all serving "
                    f"requests (max_loaded_models={self._max_models}, memory budget "
                    f"{'unlimited' if self._budget is None else f'{self._budget // MB} MB'}); "
                    "retry shortly"
                )
            victim = min(idle, key=lambda r: r.last_used)
            logger.info("evicting %s to make room for %s", victim.model_id, source.model_id)
            await self._close(victim)

    def _fits(self, need: int) -> bool:
        count = len(self._loaded) + len(self._reserved)
        used = sum(r.size_bytes for r in self._loaded.values()) + sum(self._reserved.values())
        within_budget = self._budget is None or used + need <= self._budget
        return count < self._max_models and within_budget

    async def _discard(self, resident: Resident, reason: str) -> None:
        """Unload a model whose engine died, so that the next request loads it afresh."""
        async with self._lock:
            self._failed[resident.model_id] = reason
            if self._loaded.get(resident.model_id) is resident:
                logger.error("%s failed (%s): unloading it", resident.model_id, reason)
                await self._close(resident)

    async def _close(self, resident: Resident) -> None:
        """Forget and stop a model; its requests in flight end with `EngineClosedError`."""
        if self._loaded.get(resident.model_id) is resident:
            del self._loaded[resident.model_id]
        logger.info("unloading %s", resident.model_id)
        await resident.model.aclose()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_INTERVAL)
            now = time.monotonic()
            for resident in [r for r in self._loaded.values() if r.is_expired(now)]:
                async with self._lock:
                    still_loaded = self._loaded.get(resident.model_id) is resident
                    if still_loaded and resident.is_expired(time.monotonic()):
                        logger.info("%s idle for %.0fs (ttl)", resident.model_id, resident.ttl)
                        await self._close(resident)


def _disk_size(path: Path) -> int:
    """Bytes of a model file, or of every file in a model folder: the memory estimate."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
