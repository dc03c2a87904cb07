"""OpenAI's routes: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`.

Each handler validates the body (`parse_body`), takes a lease on the model from the pool, and
calls the `AsyncModel` API; nothing here touches the engine. A stream is opened and its first
chunk awaited before the response starts, so a bad request is still a plain 400; after that an
error can only be an SSE `data: {"error": ...}` event, after which the stream closes without
`[DONE]`. A client that hangs up cancels the handler's task, which closes the model's stream
and so frees the sequence in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ladle.model import AsyncModel
from ladle.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    StreamOptions,
    parse_body,
)
from ladle.server.errors import DeadlineExceededError, to_error
from ladle.server.lifecycle import Lease, ModelPool
from ladle.server.metrics import Metrics
from ladle.server.openapi import Operation, documented
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog

logger = logging.getLogger(__name__)

Chunk = ChatCompletionChunk | CompletionResponse
StreamedRequest = TypeVar("StreamedRequest", ChatCompletionRequest, CompletionRequest)


class OpenAIRoutes:
    def __init__(
        self,
        pool: ModelPool,
        metrics: Metrics,
        catalog: Callable[[], Catalog],
        cache: ModelCache,
        request_timeout: float | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.catalog = catalog
        self.cache = cache
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]

    @documented(
        Operation(
            "Chat completion (streamed as server-sent events with stream: true)",
            "OpenAI",
            body=ChatCompletionRequest,
            returns=ChatCompletionResponse,
            streams=True,
            errors=(400, 404, 503, 504),
        )
    )
    async def chat_completions(self, request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        deadline = self._deadline(req.timeout)
        if req.stream:
            counted, wants_usage = _counting_usage(req)
            return await self._stream(
                req.model, lambda m: m.stream_chat_request(counted), wants_usage, deadline, req.n
            )
        async with self.pool.use(req.model, req.n) as model, _within(deadline):
            response = await model.send_chat_request(req)
        usage = response.usage
        self.metrics.observe_tokens(response.model, usage.prompt_tokens, usage.completion_tokens)
        return _json(response.model_dump_json())

    @documented(
        Operation(
            "Text completion of a plain prompt",
            "OpenAI",
            body=CompletionRequest,
            returns=CompletionResponse,
            streams=True,
            errors=(400, 404, 503, 504),
        )
    )
    async def completions(self, request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        deadline = self._deadline(req.timeout)
        if req.stream:
            counted, wants_usage = _counting_usage(req)
            return await self._stream(
                req.model,
                lambda m: m.stream_completion_request(counted),
                wants_usage,
                deadline,
                req.n,
            )
        async with self.pool.use(req.model, req.n) as model, _within(deadline):
            response = await model.send_completion_request(req)
        if response.usage is not None:
            usage = response.usage
            self.metrics.observe_tokens(
                response.model, usage.prompt_tokens, usage.completion_tokens
            )
        return _json(response.model_dump_json())

    @documented(
        Operation(
            "Embeddings of texts or token ids",
            "OpenAI",
            body=EmbeddingRequest,
            returns=EmbeddingResponse,
            errors=(400, 404, 503),
        )
    )
    async def embeddings(self, request: Request) -> Response:
        """Concurrent requests to one model are embedded together by its worker."""
        req = parse_body(EmbeddingRequest, await request.body())
        async with self.pool.use(req.model) as model:
            response = await model.send_embedding_request(req)
        self.metrics.observe_tokens(response.model, response.usage.prompt_tokens, 0)
        return _json(response.model_dump_json())

    @documented(Operation("The models this service can serve now", "OpenAI", returns=ModelList))
    async def models(self, request: Request) -> Response:
        """The models this service can serve now: the loaded ones, then the rest of the cache
        (and registered local models)."""
        entries = {e.id: e for e in self.catalog().entries()}

        def owner(model_id: str) -> str:
            entry = entries.get(model_id)
            return entry.publisher if entry is not None and entry.publisher else "ladle"

        cards = {
            r.model_id: ModelCard(
                id=r.model_id, created=int(r.loaded_at), owned_by=owner(r.model_id)
            )
            for r in self.pool.residents()
        }
        for entry in entries.values():
            if entry.id not in cards and self.cache.is_cached(entry):
                created = _mtime(self.cache.model_path(entry))
                cards[entry.id] = ModelCard(id=entry.id, created=created, owned_by=owner(entry.id))
        return _json(ModelList(data=list(cards.values())).model_dump_json())

    async def _stream(
        self,
        name: str,
        open_stream: Callable[[AsyncModel], AsyncGenerator[Chunk, None]],
        usage: bool,
        deadline: float | None,
        sequences: int,
    ) -> Response:
        meter = _StreamMeter(self.metrics, time.perf_counter(), usage)
        lease = await self.pool.acquire(name, sequences)
        try:
            stream = open_stream(lease.model)
            async with _within(deadline):
                first = await anext(stream, None)  # validates the request before headers go
        except BaseException:
            lease.release()
            raise
        events = _sse(stream, first, lease, meter, deadline)
        return ClosingStreamingResponse(
            events, media_type="text/event-stream", stall_timeout=self.stall_timeout
        )

    def _deadline(self, asked: float | None) -> float | None:
        """When the request must be done (the event loop's clock): its own `timeout`, within
        the service's `request_timeout`."""
        limits = [t for t in (asked, self.request_timeout) if t is not None]
        return asyncio.get_running_loop().time() + min(limits) if limits else None


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its generator however the response ends.

    When a client hangs up while a chunk is being sent, Starlette abandons the generator at its
    `yield`, leaving its `finally` to the garbage collector; closing it here runs that `finally`
    (which releases the model and aborts the request) at once. A client that stops reading
    without hanging up blocks the sending of a chunk once the socket's buffers are full: past
    `stall_timeout` seconds of that, it is cut off the same way, so its sequence stops using
    the engine and its KV blocks are freed.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes | str, None],
        media_type: str,
        stall_timeout: float | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type)
        self._content = content
        self._stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_cut_off(message: Message) -> None:
            try:
                async with asyncio.timeout(self._stall_timeout):
                    await send(message)
            except TimeoutError:
                logger.warning("a client stopped reading its stream: cut off")
                raise ClientStalledError from None

        try:
            await super().__call__(scope, receive, send_or_cut_off)
        except ClientStalledError:
            return  # the stream is over: nothing more can reach that client
        finally:
            await self._content.aclose()


class ClientStalledError(Exception):
    """A stream's client read nothing for `stall_timeout` seconds."""


class _StreamMeter:
    """Time to first token and token counts of one stream, and which chunks the client gets."""

    def __init__(self, metrics: Metrics, started: float, wants_usage: bool) -> None:
        self.metrics = metrics
        self.started = started
        self.wants_usage = wants_usage
        self.model = ""
        self.tokens = 0  # chunks that carried a token
        self.prompt_tokens: int | None = None

    def see(self, chunk: Chunk) -> Chunk | None:
        """Record `chunk`; return what to send (None drops a usage chunk nobody asked for)."""
        self.model = chunk.model
        if chunk.usage is not None and not chunk.choices:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.tokens = chunk.usage.completion_tokens
            return chunk if self.wants_usage else None
        if _carries_token(chunk):
            if self.tokens == 0:
                self.metrics.observe_first_token(chunk.model, time.perf_counter() - self.started)
            self.tokens += 1
        return chunk

    def close(self) -> None:
        if self.model:
            self.metrics.observe_tokens(self.model, self.prompt_tokens or 0, self.tokens)


def _counting_usage(req: StreamedRequest) -> tuple[StreamedRequest, bool]:
    """The request as the model gets it, always asking for usage (the metrics count tokens
    from it), and whether the client asked for usage (else that chunk is dropped)."""
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    counted = req.model_copy(update={"stream_options": StreamOptions(include_usage=True)})
    return counted, wants_usage


def _carries_token(chunk: Chunk) -> bool:
    if isinstance(chunk, ChatCompletionChunk):
        return any(c.delta.content or c.delta.tool_calls or c.finish_reason for c in chunk.choices)
    return bool(chunk.choices)


async def _sse(
    stream: AsyncGenerator[Chunk, None],
    first: Chunk | None,
    lease: Lease,
    meter: _StreamMeter,
    deadline: float | None,
) -> AsyncGenerator[bytes | str, None]:
    try:
        chunk = first
        while chunk is not None:
            sent = meter.see(chunk)
            if sent is not None:
                yield _event(sent.model_dump_json())
            async with _within(deadline):
                chunk = await anext(stream, None)
        lease.release()  # before [DONE]: a client that reads it and unloads finds the model idle
        yield b"data: [DONE]\n\n"
    except Exception as e:  # the headers are sent: the error can only be an event
        _, body = to_error(e)
        yield _event(body.model_dump_json())
    finally:
        lease.release()
        meter.close()
        await stream.aclose()  # if we stopped early, the model's stream aborts its request


@contextlib.asynccontextmanager
async def _within(deadline: float | None) -> AsyncIterator[None]:
    """Run the block until `deadline` (the loop's clock; None: no limit), else
    `DeadlineExceededError`; the awaited model call is cancelled, which aborts its request."""
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError as e:
        raise DeadlineExceededError() from e


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _json(body: str) -> Response:
    return Response(body, media_type="application/json")


def _mtime(path: Path) -> int:
    return int(path.stat().st_mtime)
