"""The `Model` API (mistral.rs's names) and its asyncio twin `AsyncModel`.

Both wrap one core that holds every rule that does no waiting: a `ModelCore` (model_core.py)
for a text model, an `EmbeddingCore` (embedding_core.py) for an embedding model; asking one
for what only the other does is an `InvalidRequestError` naming the model.
`Model` waits on a thread queue, `AsyncModel` on an asyncio queue fed thread-safely by the
engine; the methods have the same names in the same order, as httpx's `Client` and
`AsyncClient` do.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import weakref
from collections.abc import AsyncGenerator, Iterator
from typing import Any, TypeVar, overload

import torch
from pydantic import BaseModel

from ladle.embedding_core import EmbeddingCore, EmbeddingInput
from ladle.engine.engine import EngineStats, RequestHandle
from ladle.engine.sampling import SamplingParams
from ladle.engine.sequence import TokenEvent
from ladle.errors import InvalidRequestError
from ladle.messages import TextMessages
from ladle.model_core import ChatInput, CompletionInput, ModelCore, ModelInfo
from ladle.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingResponse,
    new_id,
    now,
)
from ladle.responses import Accumulator, completion_chunk
from ladle.structured import parse_structured, structured_request

M = TypeVar("M", bound=BaseModel)


class _ThreadSink:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()

    def put(self, event: TokenEvent) -> None:
        self.queue.put(event)

    def fail(self, error: BaseException) -> None:
        self.queue.put(error)


_Item = TokenEvent | BaseException  # what a request's queue carries: its events, or its error


class _Mailbox:
    """What the engine thread hands one event loop's queues, taken in one wake-up of the loop.

    The engine puts a decode step's events one after another; a `call_soon_threadsafe` each
    was a write to the loop's wake-up socket each, and the woken loop thread took the GIL from
    the engine between them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue[_Item], _Item]] = []

    def post(self, target: asyncio.Queue[_Item], item: _Item) -> None:
        with self.lock:
            self.pending.append((target, item))
            if len(self.pending) > 1:  # a wake-up is already on its way
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for target, item in pending:
            target.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
    weakref.WeakKeyDictionary()
)


class _AsyncSink:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.mailbox = _MAILBOXES.setdefault(loop, _Mailbox(loop))
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()

    def put(self, event: TokenEvent) -> None:
        self.mailbox.post(self.queue, event)

    def fail(self, error: BaseException) -> None:
        self.mailbox.post(self.queue, error)


def _text_core(core: ModelCore | EmbeddingCore) -> ModelCore:
    if isinstance(core, EmbeddingCore):
        raise InvalidRequestError(
            f"model {core.model_id!r} is an embedding model: it cannot chat or complete text",
            param="model",
        )
    return core


def _embedding_core(core: ModelCore | EmbeddingCore) -> EmbeddingCore:
    if isinstance(core, ModelCore):
        raise InvalidRequestError(
            f"model {core.model_id!r} generates text and gives no embeddings; load an "
            "embedding model (EmbeddingModelBuilder, or a catalog entry with task 'embeddings')",
            param="model",
        )
    return core


class Model:
    """A loaded model, called from blocking code. Build one with `TextModelBuilder`,
    `GgufModelBuilder` or `EmbeddingModelBuilder`; close it (or use it as a context manager)
    to stop its engine."""

    def __init__(self, core: ModelCore | EmbeddingCore) -> None:
        self._any_core = core

    @property
    def _core(self) -> ModelCore:
        return _text_core(self._any_core)

    @property
    def _embedder(self) -> EmbeddingCore:
        return _embedding_core(self._any_core)

    def chat(self, text: str) -> str:
        """Send one user message, greedily decoded, and return the reply's text."""
        return self.send_chat_request(text).choices[0].message.content or ""

    def send_chat_request(self, request: ChatInput) -> ChatCompletionResponse:
        """Run a chat request to completion; returns an OpenAI-shaped response with usage."""
        core = self._core
        req, prompt, params = core.prepare_chat(request)
        acc = core.chat_accumulator(req, prompt, params)
        for event in self._events(prompt, params):
            acc.add(event)
        return acc.chat_response(new_id("chatcmpl"), now(), core.model_id, req.logprobs)

    def stream_chat_request(self, request: ChatInput) -> Iterator[ChatCompletionChunk]:
        """Yield OpenAI-shaped chunks as tokens are generated; closing the iterator cancels."""
        core = self._core
        req, prompt, params = core.prepare_chat(request)
        return self._stream_chat(req, prompt, params)

    def _stream_chat(
        self, req: ChatCompletionRequest, prompt: list[int], params: SamplingParams
    ) -> Iterator[ChatCompletionChunk]:
        core, rid, created = self._core, new_id("chatcmpl"), now()
        acc = core.chat_accumulator(req, prompt, params)
        yield from core.first_chunks(rid, created, params.n)
        for event in self._events(prompt, params):
            logprob = acc.add(event)
            yield from acc.chat_chunks(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.usage_chunk(rid, created, acc)

    @overload
    def generate_structured(self, schema: type[M], messages: ChatInput) -> M: ...

    @overload
    def generate_structured(self, schema: dict[str, Any], messages: ChatInput) -> Any: ...

    def generate_structured(
        self, schema: type[BaseModel] | dict[str, Any], messages: ChatInput
    ) -> Any:
        """Reply with JSON constrained to `schema` and return it parsed: an instance of a pydantic
        model, or the JSON value (a dict for an object schema) for a JSON schema dict.

        `messages` is any chat request shape; a reply cut off by its `max_tokens` raises
        `StructuredOutputError` rather than returning a partial value.
        """
        req = structured_request(self._core.chat_request(messages), schema)
        return parse_structured(schema, self.send_chat_request(req))

    def send_completion_request(self, request: CompletionInput) -> CompletionResponse:
        """Complete a plain prompt (no chat template); OpenAI's text completion shape."""
        core = self._core
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        for event in self._events(prompt, params, continues_prompt=True):
            acc.add(event)
        prefix = core.echo_prefix(req, prompt)
        return acc.completion_response(
            new_id("cmpl"), now(), core.model_id, params.logprobs, prefix
        )

    def stream_completion_request(self, request: CompletionInput) -> Iterator[CompletionResponse]:
        """Yield text completion chunks as tokens are generated."""
        core = self._core
        req, prompt, params = core.prepare_completion(request)
        return self._stream_completion(req, prompt, params)

    def _stream_completion(
        self, req: CompletionRequest, prompt: list[int], params: SamplingParams
    ) -> Iterator[CompletionResponse]:
        core, rid, created = self._core, new_id("cmpl"), now()
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        for event in self._events(prompt, params, continues_prompt=True):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield completion_chunk(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.completion_usage_chunk(rid, created, acc)

    def send_raw_chat_request(self, request: ChatInput) -> tuple[torch.Tensor, list[int]]:
        """The logits of the first generated token (float32 `[vocab]`) and the prompt ids."""
        core = self._core
        _, prompt, _ = core.prepare_chat(request)
        return core.engine.run(
            functools.partial(core.engine.prompt_logits, prompt)
        ).result(), prompt

    def logits_for(self, ids: list[int]) -> torch.Tensor:
        """Logits after every token of `ids` (float32 `[len(ids), vocab]`), as one sequence.

        Row `i` scores the token after `ids[: i + 1]`: what scoring a text (perplexity) needs.
        `send_raw_chat_request` gives only the last row, for a rendered chat. Requests being
        served pause while it runs: score a long text in windows (`ladle.perplexity` does).
        """
        return self._core.logits_for(ids).result()

    def generate_embeddings(self, request: EmbeddingInput) -> list[list[float]]:
        """One vector per input, in input order: texts, or an `EmbeddingRequestBuilder`."""
        return [d.vector() for d in self.send_embedding_request(request).data]

    def generate_embedding(self, text: str) -> list[float]:
        return self.generate_embeddings([text])[0]

    def send_embedding_request(self, request: EmbeddingInput) -> EmbeddingResponse:
        """Embed as `POST /v1/embeddings` does; OpenAI's response shape, with usage."""
        core = self._embedder
        req = core.request(request)
        inputs = core.prepare(req)
        return core.response(req, inputs, core.engine.submit(inputs).result())

    def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Token ids of a text, or of messages rendered through the chat template."""
        if isinstance(text_or_messages, str):  # any model's tokenizer
            return self._any_core.tokenizer.encode(text_or_messages, add_special_tokens)
        return self._core.tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._any_core.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def config(self) -> ModelInfo:
        """Architecture, modalities, device, dtype and context length."""
        return self._any_core.info()

    def max_sequence_length(self) -> int:
        return self._any_core.max_seq_len

    def close(self) -> None:
        self._any_core.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(
        self, prompt: list[int], params: SamplingParams, continues_prompt: bool = False
    ) -> Iterator[TokenEvent]:
        sink = _ThreadSink()
        handle = self._core.engine.submit(prompt, params, sink, continues_prompt=continues_prompt)
        yield from _drain(handle, params.n, sink.queue.get)

    # ---- the engine

    def engine_stats(self) -> EngineStats | None:
        """Sequences running and waiting, KV blocks in use, preemptions, the compiled step
        (None for an embedding model)."""
        core = self._any_core
        return core.engine.stats() if isinstance(core, ModelCore) else None

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Block until the compiled step serves (True), or it failed or is off (False)."""
        compiler = self._core.engine.compiler
        return compiler is not None and compiler.wait(timeout)

    # ---- in-place quantization (ISQ)

    def re_isq_model(self, ggml_type: str | int, model_id: str | None = None) -> str:
        """Re-quantize the linear layers to `ggml_type` (an ISQ type) while serving.

        Reads the source weights again (the resident ones, with a warning, if the file is
        gone); requests in flight go on. Returns the canonical type name.
        """
        return self._isq_core(model_id).quantizer.re_isq(str(ggml_type))

    def begin_calibration(self) -> None:
        """Start collecting each linear layer's input statistics from the traffic served."""
        self._isq_core(None).quantizer.begin_calibration()

    def calibration_status(self) -> dict[str, int]:
        """Tokens each linear layer has seen since `begin_calibration`, by module name."""
        return self._isq_core(None).quantizer.calibration_status()

    def apply_calibration(self, save_cimatrix: str | None = None) -> str:
        """Re-quantize weighted by the statistics collected; save them to `save_cimatrix`."""
        return self._isq_core(None).quantizer.apply_calibration(save_cimatrix)

    def _isq_core(self, model_id: str | None) -> ModelCore:
        core = self._core
        if model_id is not None and model_id != core.model_id:
            raise InvalidRequestError(f"this model is {core.model_id!r}", "model_id")
        return core


def _drain(handle: RequestHandle, n: int, get: Any) -> Iterator[TokenEvent]:
    finished = 0
    try:
        while finished < n:
            item = get()
            if isinstance(item, BaseException):
                raise item
            finished += item.finish_reason is not None
            yield item
    finally:
        if finished < n:
            handle.abort()


class AsyncModel:
    """`Model` for asyncio code: the same methods, awaited; streams are async iterators."""

    def __init__(self, core: ModelCore | EmbeddingCore) -> None:
        self._any_core = core

    @property
    def _core(self) -> ModelCore:
        return _text_core(self._any_core)

    @property
    def _embedder(self) -> EmbeddingCore:
        return _embedding_core(self._any_core)

    async def chat(self, text: str) -> str:
        return (await self.send_chat_request(text)).choices[0].message.content or ""

    async def send_chat_request(self, request: ChatInput) -> ChatCompletionResponse:
        core = self._core
        req, prompt, params = core.prepare_chat(request)
        acc = core.chat_accumulator(req, prompt, params)
        async for event in self._events(prompt, params):
            acc.add(event)
        return acc.chat_response(new_id("chatcmpl"), now(), core.model_id, req.logprobs)

    async def stream_chat_request(
        self, request: ChatInput
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        core, rid, created = self._core, new_id("chatcmpl"), now()
        req, prompt, params = core.prepare_chat(request)
        acc = core.chat_accumulator(req, prompt, params)
        for chunk in core.first_chunks(rid, created, params.n):
            yield chunk
        async for event in self._events(prompt, params):
            logprob = acc.add(event)
            for chunk in acc.chat_chunks(rid, created, core.model_id, event, logprob):
                yield chunk
        if req.stream_options and req.stream_options.include_usage:
            yield core.usage_chunk(rid, created, acc)

    @overload
    async def generate_structured(self, schema: type[M], messages: ChatInput) -> M: ...

    @overload
    async def generate_structured(self, schema: dict[str, Any], messages: ChatInput) -> Any: ...

    async def generate_structured(
        self, schema: type[BaseModel] | dict[str, Any], messages: ChatInput
    ) -> Any:
        req = structured_request(self._core.chat_request(messages), schema)
        return parse_structured(schema, await self.send_chat_request(req))

    async def send_completion_request(self, request: CompletionInput) -> CompletionResponse:
        core = self._core
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in self._events(prompt, params, continues_prompt=True):
            acc.add(event)
        prefix = core.echo_prefix(req, prompt)
        return acc.completion_response(
            new_id("cmpl"), now(), core.model_id, params.logprobs, prefix
        )

    async def stream_completion_request(
        self, request: CompletionInput
    ) -> AsyncGenerator[CompletionResponse, None]:
        core, rid, created = self._core, new_id("cmpl"), now()
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in self._events(prompt, params, continues_prompt=True):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield completion_chunk(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.completion_usage_chunk(rid, created, acc)

    async def send_raw_chat_request(self, request: ChatInput) -> tuple[torch.Tensor, list[int]]:
        core = self._core
        _, prompt, _ = core.prepare_chat(request)
        logits = await asyncio.wrap_future(
            core.engine.run(functools.partial(core.engine.prompt_logits, prompt))
        )
        return logits, prompt

    async def logits_for(self, ids: list[int]) -> torch.Tensor:
        return await asyncio.wrap_future(self._core.logits_for(ids))

    async def generate_embeddings(self, request: EmbeddingInput) -> list[list[float]]:
        response = await self.send_embedding_request(request)
        return [d.vector() for d in response.data]

    async def generate_embedding(self, text: str) -> list[float]:
        return (await self.generate_embeddings([text]))[0]

    async def send_embedding_request(self, request: EmbeddingInput) -> EmbeddingResponse:
        core = self._embedder
        req = core.request(request)
        inputs = core.prepare(req)
        vectors = await asyncio.wrap_future(core.engine.submit(inputs))
        return core.response(req, inputs, vectors)

    async def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        if isinstance(text_or_messages, str):  # any model's tokenizer
            return self._any_core.tokenizer.encode(text_or_messages, add_special_tokens)
        return self._core.tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    async def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._any_core.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def config(self) -> ModelInfo:
        return self._any_core.info()

    async def max_sequence_length(self) -> int:
        return self._any_core.max_seq_len

    async def aclose(self) -> None:
        await asyncio.to_thread(self._any_core.engine.close)

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _events(
        self, prompt: list[int], params: SamplingParams, continues_prompt: bool = False
    ) -> AsyncGenerator[TokenEvent, None]:
        sink = _AsyncSink()
        handle = self._core.engine.submit(prompt, params, sink, continues_prompt=continues_prompt)
        finished = 0
        try:
            while finished < params.n:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished += item.finish_reason is not None
                yield item
        finally:
            if finished < params.n:
                handle.abort()

    # ---- in-place quantization (ISQ): `Model`'s methods, run off the event loop

    def engine_stats(self) -> EngineStats | None:
        """Sequences running and waiting, KV blocks in use, preemptions, the compiled step
        (None for an embedding model)."""
        core = self._any_core
        return core.engine.stats() if isinstance(core, ModelCore) else None

    async def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Wait until the compiled step serves (True), or it failed or is off (False)."""
        compiler = self._core.engine.compiler
        return compiler is not None and await asyncio.to_thread(compiler.wait, timeout)

    async def re_isq_model(self, ggml_type: str | int, model_id: str | None = None) -> str:
        core = self._core
        if model_id is not None and model_id != core.model_id:
            raise InvalidRequestError(f"this model is {core.model_id!r}", "model_id")
        return await asyncio.to_thread(core.quantizer.re_isq, str(ggml_type))

    async def begin_calibration(self) -> None:
        await asyncio.to_thread(self._core.quantizer.begin_calibration)

    async def calibration_status(self) -> dict[str, int]:
        return self._core.quantizer.calibration_status()

    async def apply_calibration(self, save_cimatrix: str | None = None) -> str:
        return await asyncio.to_thread(self._core.quantizer.apply_calibration, save_cimatrix)
