"""The `Model` API (mistral.rs's names) and its asyncio twin `AsyncModel`.

Both wrap one `ModelCore`, which holds every rule that does no waiting: how a request becomes
a prompt and sampling parameters, and how events become responses. `Model` waits on a thread
queue, `AsyncModel` on an asyncio queue fed thread-safely by the engine; the methods have the
same names in the same order, as httpx's `Client` and `AsyncClient` do.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ladle.engine.engine import EngineConfig, LLMEngine, RequestHandle
from ladle.engine.loader import LoadedModel
from ladle.engine.loading.chat_template import render_chat_template, validate_messages
from ladle.engine.sampling import SamplingParams
from ladle.engine.sequence import TokenEvent
from ladle.errors import InvalidRequestError
from ladle.messages import RequestBuilder, TextMessages
from ladle.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    new_id,
    now,
    parse_request,
)
from ladle.responses import Accumulator, chat_chunk, completion_logprobs

ChatInput = str | list[dict[str, Any]] | TextMessages | RequestBuilder | ChatCompletionRequest
CompletionInput = str | list[int] | CompletionRequest | dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What `Model.config()` reports."""

    model_id: str
    architecture: str
    modalities: dict[str, list[str]]
    device: str
    dtype: str
    max_seq_len: int
    file_format: str
    path: str


class ModelCore:
    """Request and response rules shared by `Model` and `AsyncModel` (no waiting here)."""

    def __init__(
        self, loaded: LoadedModel, model_id: str, max_num_seqs: int, max_seq_len: int | None
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id
        context = loaded.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len, context) if max_seq_len else context
        self.engine = LLMEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(self.max_seq_len, loaded.dtype, max_num_seqs),
        )

    # ---- requests

    def chat_request(self, request: ChatInput) -> ChatCompletionRequest:
        if isinstance(request, ChatCompletionRequest):
            return request
        if isinstance(request, (TextMessages, RequestBuilder)):
            return request.to_request()
        if isinstance(request, str):
            return parse_request(
                ChatCompletionRequest,
                {"messages": [{"role": "user", "content": request}], "temperature": 0.0},
            )
        if isinstance(request, list):
            return parse_request(ChatCompletionRequest, {"messages": request})
        if isinstance(request, dict):
            return parse_request(ChatCompletionRequest, request)
        raise InvalidRequestError(f"cannot send a {type(request).__name__} as a chat request")

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        template = self.tokenizer.chat_template
        if template is None:
            raise InvalidRequestError(
                f"model {self.model_id!r} has no chat template; use send_completion_request "
                "or pass chat_template= to the builder",
                param="messages",
            )
        return render_chat_template(
            template,
            validate_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            **kwargs,
        )

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        text = self.render_chat(
            [m.to_template_dict() for m in req.messages],
            tools=req.tools,
            enable_thinking=req.enable_thinking,
            **(req.chat_template_kwargs or {}),
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_request(self, request: CompletionInput) -> CompletionRequest:
        if isinstance(request, CompletionRequest):
            return request
        if isinstance(request, (str, list)):
            return parse_request(CompletionRequest, {"prompt": request, "max_tokens": None})
        return parse_request(CompletionRequest, request)

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt, add_special_tokens=True)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="prompt")
        return list(req.prompt)

    def sampling(
        self, req: ChatCompletionRequest | CompletionRequest, logprobs: bool, top: int
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=req.token_limit(),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=dict(req.logit_bias or {}),
            seed=req.seed,
            stop=req.stop_list(),
            logprobs=logprobs,
            top_logprobs=top,
            n=req.n,
            truncate_sequence=req.truncate_sequence,
        )

    def prepare_chat(
        self, request: ChatInput
    ) -> tuple[ChatCompletionRequest, list[int], SamplingParams]:
        """The validated request, its prompt as it will run, and its sampling parameters."""
        req = self.chat_request(request)
        params = self.sampling(req, req.logprobs, req.top_logprobs or 0)
        return req, self.engine.fit_prompt(self.chat_prompt(req), params), params

    def prepare_completion(
        self, request: CompletionInput
    ) -> tuple[CompletionRequest, list[int], SamplingParams]:
        req = self.completion_request(request)
        params = self.sampling(req, req.logprobs is not None, req.logprobs or 0)
        return req, self.engine.fit_prompt(self.completion_prompt(req), params), params

    # ---- responses

    def echo_prefix(self, req: CompletionRequest, prompt: list[int]) -> str:
        """The prompt text that `echo` puts before the completion."""
        if not req.echo:
            return ""
        if isinstance(req.prompt, str) and len(prompt) == len(self.completion_prompt(req)):
            return req.prompt
        return self.detokenize(prompt, skip_special_tokens=True)  # ids, or a truncated prompt

    def first_chunks(self, rid: str, created: int, n: int) -> list[ChatCompletionChunk]:
        return [
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=self.model_id,
                choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))],
            )
            for i in range(n)
        ]

    def usage_chunk(self, rid: str, created: int, acc: Accumulator) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=rid, created=created, model=self.model_id, choices=[], usage=acc.usage()
        )

    # ---- tokens and facts

    def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        if isinstance(text_or_messages, str):
            return self.tokenizer.encode(text_or_messages, add_special_tokens=add_special_tokens)
        messages = (
            text_or_messages.messages
            if isinstance(text_or_messages, TextMessages)
            else text_or_messages
        )
        text = self.render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id,
            architecture=self.loaded.config.architecture,
            modalities={"input": ["text"], "output": ["text"]},
            device="cpu",
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            max_seq_len=self.max_seq_len,
            file_format=self.loaded.file_format,
            path=str(self.loaded.path),
        )

    def raw_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits of the token after `prompt_ids` (runs on the engine thread)."""
        model = self.loaded.model
        with torch.inference_mode():
            cache = model.new_cache(self.loaded.dtype)
            ids = torch.tensor(prompt_ids, dtype=torch.long)
            last = torch.tensor([len(prompt_ids) - 1])
            return model(ids, torch.arange(len(prompt_ids)), cache, logits_indices=last)[0]


class _ThreadSink:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()

    def put(self, event: TokenEvent) -> None:
        self.queue.put(event)

    def fail(self, error: BaseException) -> None:
        self.queue.put(error)


class _AsyncSink:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

    def put(self, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class Model:
    """A loaded model, called from blocking code. Build one with `TextModelBuilder` or
    `GgufModelBuilder`; close it (or use it as a context manager) to stop its engine."""

    def __init__(self, core: ModelCore) -> None:
        self._core = core

    def chat(self, text: str) -> str:
        """Send one user message, greedily decoded, and return the reply's text."""
        return self.send_chat_request(text).choices[0].message.content or ""

    def send_chat_request(self, request: ChatInput) -> ChatCompletionResponse:
        """Run a chat request to completion; returns an OpenAI-shaped response with usage."""
        core = self._core
        req, prompt, params = core.prepare_chat(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
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
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        yield from core.first_chunks(rid, created, params.n)
        for event in self._events(prompt, params):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield chat_chunk(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.usage_chunk(rid, created, acc)

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
        _, prompt, params = core.prepare_completion(request)
        return self._stream_completion(prompt, params)

    def _stream_completion(
        self, prompt: list[int], params: SamplingParams
    ) -> Iterator[CompletionResponse]:
        core, rid, created = self._core, new_id("cmpl"), now()
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        for event in self._events(prompt, params, continues_prompt=True):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield _completion_chunk(rid, created, core.model_id, event, logprob)

    def send_raw_chat_request(self, request: ChatInput) -> tuple[torch.Tensor, list[int]]:
        """The logits of the first generated token (float32 `[vocab]`) and the prompt ids."""
        core = self._core
        _, prompt, _ = core.prepare_chat(request)
        return core.engine.run(lambda: core.raw_logits(prompt)).result(), prompt

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
        return self._core.tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._core.detokenize(ids, skip_special_tokens=skip_special_tokens)

    def config(self) -> ModelInfo:
        """Architecture, modalities, device, dtype and context length."""
        return self._core.info()

    def max_sequence_length(self) -> int:
        return self._core.max_seq_len

    def close(self) -> None:
        self._core.engine.close()

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

    def __init__(self, core: ModelCore) -> None:
        self._core = core

    async def chat(self, text: str) -> str:
        return (await self.send_chat_request(text)).choices[0].message.content or ""

    async def send_chat_request(self, request: ChatInput) -> ChatCompletionResponse:
        core = self._core
        req, prompt, params = core.prepare_chat(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in self._events(prompt, params):
            acc.add(event)
        return acc.chat_response(new_id("chatcmpl"), now(), core.model_id, req.logprobs)

    async def stream_chat_request(self, request: ChatInput) -> AsyncIterator[ChatCompletionChunk]:
        core, rid, created = self._core, new_id("chatcmpl"), now()
        req, prompt, params = core.prepare_chat(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        for chunk in core.first_chunks(rid, created, params.n):
            yield chunk
        async for event in self._events(prompt, params):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield chat_chunk(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.usage_chunk(rid, created, acc)

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
    ) -> AsyncIterator[CompletionResponse]:
        core, rid, created = self._core, new_id("cmpl"), now()
        _, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in self._events(prompt, params, continues_prompt=True):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield _completion_chunk(rid, created, core.model_id, event, logprob)

    async def send_raw_chat_request(self, request: ChatInput) -> tuple[torch.Tensor, list[int]]:
        core = self._core
        _, prompt, _ = core.prepare_chat(request)
        logits = await asyncio.wrap_future(core.engine.run(lambda: core.raw_logits(prompt)))
        return logits, prompt

    async def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        return self._core.tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    async def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._core.detokenize(ids, skip_special_tokens=skip_special_tokens)

    async def config(self) -> ModelInfo:
        return self._core.info()

    async def max_sequence_length(self) -> int:
        return self._core.max_seq_len

    async def aclose(self) -> None:
        await asyncio.to_thread(self._core.engine.close)

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _events(
        self, prompt: list[int], params: SamplingParams, continues_prompt: bool = False
    ) -> AsyncIterator[TokenEvent]:
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


def _completion_chunk(
    rid: str, created: int, model: str, event: TokenEvent, logprob: Any
) -> CompletionResponse:
    choice = CompletionChoice(
        index=event.index,
        text=event.text,
        finish_reason=event.finish_reason,  # type: ignore[arg-type]
        logprobs=completion_logprobs([logprob]) if logprob else None,
    )
    return CompletionResponse(id=rid, created=created, model=model, choices=[choice])
