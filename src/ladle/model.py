"""The `Model` API (mistral.rs's names) and its asyncio twin `AsyncModel`.

Both hold one or more cores by model id (`MultiModelBuilder` builds several; a call without
`model_id=` goes to the default one). A core holds every rule that does no waiting: a
`ModelCore` (cores/text.py) for a text model, an `EmbeddingCore` (cores/embedding.py) for an
embedding model; asking one for what only the other does is an `InvalidRequestError` naming
the model.
`Model` waits on a thread queue, `AsyncModel` on an asyncio queue fed thread-safely by the
engine; the methods have the same names in the same order, as httpx's `Client` and
`AsyncClient` do.
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

import numpy as np
import torch
from pydantic import BaseModel

from ladle.cores.embedding import EmbeddingCore, EmbeddingInput
from ladle.cores.responses import Accumulator, completion_chunk
from ladle.cores.speech import SpeechCore, SpeechInput, SpeechOutput, audio_delta, audio_done
from ladle.cores.structured import parse_structured, structured_request
from ladle.cores.text import ChatInput, CompletionInput, ModelCore, ModelInfo
from ladle.cores.transcription import AudioInput, TranscriptionCore
from ladle.engine.engine import EngineStats, RequestHandle
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.sampling import SamplingParams
from ladle.engine.sequence import TokenEvent
from ladle.errors import InvalidRequestError, ModelNotFoundError
from ladle.messages import TextMessages
from ladle.protocol.audio import TranscriptionForm, VerboseTranscription
from ladle.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingResponse,
    new_id,
    now,
)
from ladle.tools.files import StoredFile
from ladle.tools.runtime import AgentRun, Toolbox

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


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


Core = ModelCore | EmbeddingCore | SpeechCore | TranscriptionCore
C = TypeVar("C", ModelCore, EmbeddingCore, SpeechCore, TranscriptionCore)
# what each kind of model does, and which builder or catalog task gives one, for errors
_KINDS: dict[type[Any], tuple[str, str]] = {
    ModelCore: ("a text model", "TextModelBuilder, or a catalog entry with task 'chat-completion'"),
    EmbeddingCore: (
        "an embedding model",
        "EmbeddingModelBuilder, or a catalog entry with task 'embeddings'",
    ),
    SpeechCore: (
        "a text-to-speech voice",
        "SpeechModelBuilder, or a catalog entry with task 'text-to-speech'",
    ),
    TranscriptionCore: (
        "a speech recognizer",
        "TranscriptionModelBuilder, or a catalog entry with task 'automatic-speech-recognition'",
    ),
}


def _of_kind(core: Core, kind: type[C], wanted: str) -> C:
    """`core` if it is a `kind`, else an error naming the model, what it is and what to load."""
    if isinstance(core, kind):
        return core
    what, how = _KINDS[type(core)][0], _KINDS[kind][1]
    raise InvalidRequestError(
        f"model {core.model_id!r} is {what}: it cannot {wanted}; load {_KINDS[kind][0]} ({how})",
        param="model",
    )


class ModelBuilder(Protocol):
    """What `add_model` needs of a builder (`TextModelBuilder`, `GgufModelBuilder`,
    `EmbeddingModelBuilder`): load the model, start its engine, name it `model_id`."""

    def _start(self, model_id: str | None = None) -> Core: ...


@dataclass(slots=True)
class _Slot:
    core: Core | None  # None while unloaded
    builder: ModelBuilder | None  # what loads it again (None: it cannot be reloaded)


class Models:
    """The models one `Model` or `AsyncModel` serves, by id, and the default one: what
    mistral.rs's multi-model calls (`list_models`, `set_default_model_id`, `unload_model`, ...)
    act on. Each model keeps its own engine and thread; the registry only routes, and keeps
    each model's builder so that an unloaded model can be loaded again."""

    def __init__(self, toolbox: Toolbox | None = None, owns_toolbox: bool = True) -> None:
        self._slots: dict[str, _Slot] = {}
        self.default = ""
        self.toolbox = toolbox if toolbox is not None else Toolbox()
        self.owns_toolbox = owns_toolbox  # False: shared (a service's), closed by its owner
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one reload at a time: a model is never loaded twice

    @classmethod
    def of(
        cls,
        core: Core,
        builder: ModelBuilder | None = None,
        toolbox: Toolbox | None = None,
        owns_toolbox: bool = True,
    ) -> Models:
        models = cls(toolbox, owns_toolbox)
        models.add(core, builder)
        return models

    def get(self, model_id: str | None) -> Core:
        with self._lock:
            key = self.default if model_id is None else model_id
            slot = self._slot(key)
            if slot.core is None:
                raise InvalidRequestError(
                    f"model {key!r} is unloaded: reload_model({key!r}) loads it again",
                    param="model_id",
                )
            return slot.core

    def text(self, model_id: str | None) -> ModelCore:
        return _of_kind(self.get(model_id), ModelCore, "chat or complete text")

    def embedder(self, model_id: str | None) -> EmbeddingCore:
        return _of_kind(self.get(model_id), EmbeddingCore, "give embeddings")

    def tokenizer(self, model_id: str | None) -> Tokenizer:
        """The tokenizer of any model that has one (a voice speaks phonemes: it has none)."""
        core = self.get(model_id)
        if isinstance(core, SpeechCore):
            raise InvalidRequestError(
                f"model {core.model_id!r} is a text-to-speech voice: it has no tokenizer",
                param="model",
            )
        return core.tokenizer

    def voice(self, model_id: str | None) -> SpeechCore:
        return _of_kind(self.get(model_id), SpeechCore, "speak")

    def transcriber(self, model_id: str | None) -> TranscriptionCore:
        return _of_kind(self.get(model_id), TranscriptionCore, "transcribe audio")

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def status(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(i, "unloaded" if s.core is None else "loaded") for i, s in self._slots.items()]

    def cores(self) -> list[Core]:
        with self._lock:
            return [s.core for s in self._slots.values() if s.core is not None]

    def add(self, core: Core, builder: ModelBuilder | None = None) -> None:
        with self._lock:
            if core.model_id in self._slots:
                raise InvalidRequestError(
                    f"a model with id {core.model_id!r} is already loaded; give another alias",
                    param="model_id",
                )
            self._slots[core.model_id] = _Slot(core, builder)
            self.default = self.default or core.model_id

    def set_default(self, model_id: str) -> None:
        with self._lock:
            self._slot(model_id)  # raises for an unknown id
            self.default = model_id

    def remove(self, model_id: str) -> Core | None:
        """Take a model out (its engine, if loaded, is the caller's to close); the first one
        left becomes the default if it was. The last model stays: close the `Model` instead."""
        with self._lock:
            self._slot(model_id)
            if len(self._slots) == 1:
                raise InvalidRequestError(
                    f"{model_id!r} is this Model's only model: close the Model instead",
                    param="model_id",
                )
            core = self._slots.pop(model_id).core
            if self.default == model_id:
                self.default = next(iter(self._slots))
            return core

    def unload(self, model_id: str) -> Core:
        """Mark a model unloaded and hand back its core, whose engine the caller closes."""
        with self._lock:
            slot = self._slot(model_id)
            if slot.builder is None:
                raise InvalidRequestError(f"{model_id!r} could not be loaded again", "model_id")
            if slot.core is None:
                raise InvalidRequestError(f"{model_id!r} is already unloaded", "model_id")
            core, slot.core = slot.core, None
            return core

    def reload(self, model_id: str) -> None:
        """Load an unloaded model again from its builder (blocking: seconds); a loaded one is
        left as it is."""
        with self._loading:
            with self._lock:
                slot = self._slot(model_id)
                if slot.core is not None or slot.builder is None:
                    return
            core = slot.builder._start(model_id)
            with self._lock:
                slot.core = core

    def _slot(self, model_id: str) -> _Slot:
        slot = self._slots.get(model_id)
        if slot is None:
            raise ModelNotFoundError(model_id, f"this Model holds {sorted(self._slots)}")
        return slot


class _Routing:
    """What `Model` and `AsyncModel` share as is: their models by id, and the calls on them
    that never wait."""

    def __init__(self, models: Core | Models) -> None:
        self._models = models if isinstance(models, Models) else Models.of(models)

    @property
    def _core(self) -> ModelCore:
        return self._models.text(None)

    def list_models(self) -> list[str]:
        """The ids of the models served, in the order they were added."""
        return self._models.ids()

    def get_default_model_id(self) -> str:
        """The model a call without `model_id` goes to."""
        return self._models.default

    def set_default_model_id(self, model_id: str) -> None:
        self._models.set_default(model_id)

    def is_model_loaded(self, model_id: str) -> bool:
        """Whether `model_id` is one of these models and loaded (not `unload_model`-ed)."""
        return (model_id, "loaded") in self._models.status()

    def list_models_with_status(self) -> list[tuple[str, str]]:
        """Each model's id and "loaded" or "unloaded" (`unload_model`)."""
        return self._models.status()

    def engine_stats(self, model_id: str | None = None) -> EngineStats | None:
        """Sequences running and waiting, KV blocks in use, preemptions, the compiled step
        (None for an embedding model)."""
        core = self._models.get(model_id)
        return core.engine.stats() if isinstance(core, ModelCore) else None

    def engine_failure(self, model_id: str | None = None) -> str | None:
        """Why a text model's engine thread died, if it did (its calls then fail at once with
        `EngineClosedError`; unload and load it again); None while it serves."""
        core = self._models.get(model_id)
        return core.engine.failure if isinstance(core, ModelCore) else None

    @property
    def toolbox(self) -> Toolbox:
        """The server-side tools, sessions and files these models share."""
        return self._models.toolbox

    def _close_toolbox(self) -> None:
        if self._models.owns_toolbox:
            self._models.toolbox.close()


def _with_session(request: ChatInput, core: ModelCore, session_id: str | None) -> Any:
    req = core.chat_request(request)
    return req if session_id is None else req.model_copy(update={"session_id": session_id})


class Model(_Routing):
    """Loaded models, called from blocking code. Build one with `TextModelBuilder`,
    `GgufModelBuilder` or `EmbeddingModelBuilder`, or several with `MultiModelBuilder`; every
    call takes `model_id=` to pick one (default: the default model). Close it (or use it as a
    context manager) to stop the engines."""

    # ---- several models (mistral.rs's multi-model calls; `list_models` and the default
    # model's id come from `_Routing`)

    def add_model(self, builder: ModelBuilder, alias: str | None = None) -> str:
        """Load another model (its own engine and thread) under `alias` (default: the builder's
        model id); returns its id."""
        core = builder._start(alias)
        try:
            self._models.add(core, builder)
        except BaseException:
            core.engine.close()
            raise
        return core.model_id

    def remove_model(self, model_id: str) -> None:
        """Stop a model's engine and forget it; requests it is running fail with
        `EngineClosedError`."""
        core = self._models.remove(model_id)
        if core is not None:
            core.engine.close()

    def unload_model(self, model_id: str) -> None:
        """Stop a model's engine and free its memory, keeping its id: calls to it fail until
        `reload_model` loads it again from its builder."""
        self._models.unload(model_id).engine.close()

    def reload_model(self, model_id: str) -> None:
        """Load an unloaded model again (as its builder did); a loaded one is left as is."""
        self._models.reload(model_id)

    # ---- text

    def chat(self, text: str, *, model_id: str | None = None, session_id: str | None = None) -> str:
        """Send one user message, greedily decoded, and return the reply's text."""
        reply = self.send_chat_request(text, model_id=model_id, session_id=session_id)
        return reply.choices[0].message.content or ""

    def send_chat_request(
        self, request: ChatInput, *, model_id: str | None = None, session_id: str | None = None
    ) -> ChatCompletionResponse:
        """Run a chat request to completion; returns an OpenAI-shaped response with usage.

        With `session_id` (or the request's own field) the request's messages continue that
        stored conversation, and the reply is stored in it. With server-side tools (tool
        callbacks, MCP), the model's calls to them run here, for up to `max_tool_rounds`
        rounds, and the response is the final answer, with `agent_events` listing the calls.
        """
        core = self._models.text(model_id)
        req = _with_session(request, core, session_id)
        toolbox = self._models.toolbox
        if not toolbox.engaged(req):
            return _chat_once(core, req)
        with toolbox.holding(req.session_id):
            run = AgentRun(req, toolbox)
            while True:
                response = _chat_once(core, run.request())
                calls = run.take(response)
                if calls:
                    run.record(calls, toolbox.run_calls(calls).result())
                if run.done:
                    return run.finish(response)

    def stream_chat_request(
        self, request: ChatInput, *, model_id: str | None = None, session_id: str | None = None
    ) -> Iterator[ChatCompletionChunk]:
        """Yield OpenAI-shaped chunks as tokens are generated; closing the iterator cancels.

        Sessions and server-side tools work as in `send_chat_request`; each tool call's
        progress comes as a chunk with no choices and an `agent_event`."""
        core = self._models.text(model_id)
        req = _with_session(request, core, session_id)
        toolbox = self._models.toolbox
        if not toolbox.engaged(req):
            req, prompt, params = core.prepare_chat(req)
            return _stream_chat(core, req, prompt, params)
        run = AgentRun(req, toolbox)
        return _stream_agent(core, req, toolbox, run)

    @overload
    def generate_structured(
        self, schema: type[M], messages: ChatInput, *, model_id: str | None = None
    ) -> M: ...

    @overload
    def generate_structured(
        self, schema: dict[str, Any], messages: ChatInput, *, model_id: str | None = None
    ) -> Any: ...

    def generate_structured(
        self,
        schema: type[BaseModel] | dict[str, Any],
        messages: ChatInput,
        *,
        model_id: str | None = None,
    ) -> Any:
        """Reply with JSON constrained to `schema` and return it parsed: an instance of a pydantic
        model, or the JSON value (a dict for an object schema) for a JSON schema dict.

        `messages` is any chat request shape; a reply cut off by its `max_tokens` raises
        `StructuredOutputError` rather than returning a partial value.
        """
        req = structured_request(self._models.text(model_id).chat_request(messages), schema)
        return parse_structured(schema, self.send_chat_request(req, model_id=model_id))

    def send_completion_request(
        self, request: CompletionInput, *, model_id: str | None = None
    ) -> CompletionResponse:
        """Complete a plain prompt (no chat template); OpenAI's text completion shape."""
        core = self._models.text(model_id)
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        for event in _events(core, prompt, params, continues_prompt=True):
            acc.add(event)
        prefix = core.echo_prefix(req, prompt)
        return acc.completion_response(
            new_id("cmpl"), now(), core.model_id, params.logprobs, prefix
        )

    def stream_completion_request(
        self, request: CompletionInput, *, model_id: str | None = None
    ) -> Iterator[CompletionResponse]:
        """Yield text completion chunks as tokens are generated."""
        core = self._models.text(model_id)
        req, prompt, params = core.prepare_completion(request)
        return _stream_completion(core, req, prompt, params)

    def send_raw_chat_request(
        self, request: ChatInput, *, model_id: str | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The logits of the first generated token (float32 `[vocab]`) and the prompt ids."""
        core = self._models.text(model_id)
        _, prompt, _ = core.prepare_chat(request)
        return core.engine.run(
            functools.partial(core.engine.prompt_logits, prompt)
        ).result(), prompt

    def logits_for(self, ids: list[int], *, model_id: str | None = None) -> torch.Tensor:
        """Logits after every token of `ids` (float32 `[len(ids), vocab]`), as one sequence.

        Row `i` scores the token after `ids[: i + 1]`: what scoring a text (perplexity) needs.
        `send_raw_chat_request` gives only the last row, for a rendered chat. Requests being
        served pause while it runs: score a long text in windows (`ladle.perplexity` does).
        """
        return self._models.text(model_id).logits_for(ids).result()

    # ---- sessions, tools and their files (mistral.rs's names)

    def list_session_ids(self) -> list[str]:
        """Stored sessions, most recently used first."""
        return self.toolbox.sessions.ids()

    def export_session(self, session_id: str) -> str:
        """The session as JSON text (its messages, and its files' bodies) that
        `import_session` takes back, in this process or another."""
        return json.dumps(self.toolbox.sessions.export(session_id))

    def import_session(self, data: str | bytes | dict[str, Any]) -> str:
        """Store an exported session under its id (replacing one with that id); returns it."""
        return self.toolbox.sessions.import_(data)

    def delete_session(self, session_id: str) -> None:
        self.toolbox.sessions.delete(session_id)

    def fork_session(self, source: str, dest: str, num_turns: int | None = None) -> None:
        """Copy `source` into a new session `dest`: its first `num_turns` turns (a turn is a
        user message and what answered it), or all of it."""
        self.toolbox.sessions.fork(source, dest, num_turns)

    def list_mcp_tools(self) -> list[tuple[str, str]]:
        """(name, description) of every tool of the connected MCP servers."""
        return self.toolbox.list_mcp_tools()

    def find_file(self, file_id: str) -> StoredFile:
        """A file a server-side tool produced (`file-...`), its whole body included."""
        return self.toolbox.find_file(file_id)

    # ---- embeddings

    def generate_embeddings(
        self, request: EmbeddingInput, *, model_id: str | None = None
    ) -> list[list[float]]:
        """One vector per input, in input order: texts, or an `EmbeddingRequestBuilder`."""
        return [d.vector() for d in self.send_embedding_request(request, model_id=model_id).data]

    def generate_embedding(self, text: str, *, model_id: str | None = None) -> list[float]:
        return self.generate_embeddings([text], model_id=model_id)[0]

    def send_embedding_request(
        self, request: EmbeddingInput, *, model_id: str | None = None
    ) -> EmbeddingResponse:
        """Embed as `POST /v1/embeddings` does; OpenAI's response shape, with usage."""
        core = self._models.embedder(model_id)
        req = core.request(request)
        inputs = core.prepare(req)
        return core.response(req, inputs, core.engine.submit(inputs).result())

    # ---- speech (a text-to-speech voice)

    def generate_speech(
        self,
        text: str,
        *,
        voice: str = "default",
        speed: float = 1.0,
        seed: int | None = None,
        model_id: str | None = None,
    ) -> SpeechOutput:
        """`text` spoken: `pcm, sample_rate, channels = model.generate_speech(...)` (mistral.rs's
        order; `pcm` a float32 array). `.save("hello.wav")` writes it to a file."""
        core = self._models.voice(model_id)
        plan = core.plan(core.request(text, voice=voice, speed=speed, seed=seed))
        pieces = [core.engine.run(functools.partial(core.speak, plan, i)) for i in plan]
        return SpeechOutput(np.concatenate(pieces), core.voice.sample_rate, 1)

    def send_speech_request(self, request: SpeechInput, *, model_id: str | None = None) -> bytes:
        """The audio file `POST /v1/audio/speech` answers with, in the request's
        `response_format` (mp3 by default, as OpenAI's)."""
        return b"".join(self.stream_speech_request(request, model_id=model_id))

    def stream_speech_request(
        self, request: SpeechInput, *, model_id: str | None = None
    ) -> Iterator[bytes]:
        """The audio's bytes as they are spoken: WAV and PCM sentence by sentence, the other
        formats after the last one; with `stream_format: "sse"`, OpenAI's speech events.
        A bad request raises here, before the first byte."""
        core = self._models.voice(model_id)
        plan = core.plan(core.request(request))
        encoder = core.encoder(plan.request)
        sse = plan.request.stream_format == "sse"

        def chunks() -> Iterator[bytes]:
            for i in plan:
                piece = encoder.feed(core.engine.run(functools.partial(core.speak, plan, i)))
                if piece:
                    yield audio_delta(piece) if sse else piece
            tail = encoder.finish()
            if tail:
                yield audio_delta(tail) if sse else tail
            if sse:
                yield audio_done(plan)

        return chunks()

    # ---- transcription (a speech recognizer)

    def transcribe(
        self,
        audio: AudioInput,
        *,
        sample_rate: int | None = None,
        language: str | None = None,
        timestamps: bool = False,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        model_id: str | None = None,
    ) -> VerboseTranscription:
        """The text of `audio`: a path, a file's bytes (WAV, FLAC, OGG, MP3; more with ffmpeg)
        or an array at `sample_rate`, of any rate and length. `timestamps` has Whisper time
        its segments (else each 30-s window is one segment); `task="translate"` gives
        English from another language (multilingual models)."""
        core = self._models.transcriber(model_id)
        form = core.form({"language": language, "prompt": prompt, "temperature": temperature})
        core.check_task(form, task)
        samples = core.audio(audio, sample_rate)
        transcript = core.engine.run(lambda: core.run(samples, form, task, timestamps))
        return core.verbose(transcript, task)

    def send_transcription_request(
        self,
        audio: AudioInput,
        fields: TranscriptionForm | dict[str, Any],
        *,
        task: str = "transcribe",
        model_id: str | None = None,
    ) -> tuple[str, str]:
        """What `POST /v1/audio/transcriptions` (or `translations`) answers: the body, in the
        form's `response_format`, and its media type."""
        core = self._models.transcriber(model_id)
        form = core.form(fields)
        core.check_task(form, task)
        samples = core.audio(audio)
        transcript = core.engine.run(lambda: core.run(samples, form, task))
        return core.response(transcript, form, task)

    # ---- tokens and facts

    def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        model_id: str | None = None,
    ) -> list[int]:
        """Token ids of a text, or of messages rendered through the chat template."""
        if isinstance(text_or_messages, str):  # any model's tokenizer
            tokenizer = self._models.tokenizer(model_id)
            return tokenizer.encode(text_or_messages, add_special_tokens)
        return self._models.text(model_id).tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    def detokenize(
        self, ids: list[int], *, skip_special_tokens: bool = False, model_id: str | None = None
    ) -> str:
        tokenizer = self._models.tokenizer(model_id)
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def config(self, model_id: str | None = None) -> ModelInfo:
        return self._models.get(model_id).info()

    def max_sequence_length(self, model_id: str | None = None) -> int:
        return self._models.get(model_id).max_seq_len

    def close(self) -> None:
        for core in self._models.cores():
            core.engine.close()
        self._close_toolbox()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the engine

    def wait_until_compiled(
        self, timeout: float | None = None, *, model_id: str | None = None
    ) -> bool:
        """Block until the compiled step serves (True), or it failed or is off (False)."""
        compiler = self._models.text(model_id).engine.compiler
        return compiler is not None and compiler.wait(timeout)

    # ---- in-place quantization (ISQ)

    def re_isq_model(self, ggml_type: str | int, model_id: str | None = None) -> str:
        """Re-quantize the linear layers to `ggml_type` (an ISQ type) while serving.

        Reads the source weights again (the resident ones, with a warning, if the file is
        gone); requests in flight go on. Returns the canonical type name.
        """
        return self._models.text(model_id).quantizer.re_isq(str(ggml_type))

    def begin_calibration(self, model_id: str | None = None) -> None:
        """Start collecting each linear layer's input statistics from the traffic served."""
        self._models.text(model_id).quantizer.begin_calibration()

    def calibration_status(self, model_id: str | None = None) -> dict[str, int]:
        """Tokens each linear layer has seen since `begin_calibration`, by module name."""
        return self._models.text(model_id).quantizer.calibration_status()

    def apply_calibration(
        self, save_cimatrix: str | None = None, model_id: str | None = None
    ) -> str:
        """Re-quantize weighted by the statistics collected; save them to `save_cimatrix`."""
        return self._models.text(model_id).quantizer.apply_calibration(save_cimatrix)


def _events(
    core: ModelCore, prompt: list[int], params: SamplingParams, continues_prompt: bool = False
) -> Iterator[TokenEvent]:
    sink = _ThreadSink()
    handle = core.engine.submit(prompt, params, sink, continues_prompt=continues_prompt)
    yield from _drain(handle, params.n, sink.queue.get)


def _chat_once(core: ModelCore, request: ChatCompletionRequest) -> ChatCompletionResponse:
    req, prompt, params = core.prepare_chat(request)
    acc = core.chat_accumulator(req, prompt, params)
    for event in _events(core, prompt, params):
        acc.add(event)
    return acc.chat_response(new_id("chatcmpl"), now(), core.model_id, req.logprobs)


def _stream_agent(
    core: ModelCore, req: ChatCompletionRequest, toolbox: Toolbox, run: AgentRun
) -> Iterator[ChatCompletionChunk]:
    rid, created, model = new_id("chatcmpl"), now(), core.model_id
    with toolbox.holding(req.session_id):
        while True:
            round_req, prompt, params = core.prepare_chat(run.request())
            if run.round == 0:
                yield from core.first_chunks(rid, created, 1)
            acc = core.chat_accumulator(round_req, prompt, params)
            for event in _events(core, prompt, params):
                logprob = acc.add(event)
                for chunk in acc.chat_chunks(rid, created, model, event, logprob):
                    if (passed := run.passes(chunk)) is not None:
                        yield passed
            response = acc.chat_response(rid, created, model, round_req.logprobs)
            calls = run.take(response)
            if calls:
                yield from run.event_chunks(run.started_events(), rid, created, model)
                made = run.record(calls, toolbox.run_calls(calls).result())
                yield from run.event_chunks(made, rid, created, model)
            if run.done:
                break
        yield from run.final_chunks(response, rid, created, model)
    if req.stream_options and req.stream_options.include_usage:
        yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=run.usage)


def _stream_chat(
    core: ModelCore, req: ChatCompletionRequest, prompt: list[int], params: SamplingParams
) -> Iterator[ChatCompletionChunk]:
    rid, created = new_id("chatcmpl"), now()
    acc = core.chat_accumulator(req, prompt, params)
    yield from core.first_chunks(rid, created, params.n)
    for event in _events(core, prompt, params):
        logprob = acc.add(event)
        yield from acc.chat_chunks(rid, created, core.model_id, event, logprob)
    if req.stream_options and req.stream_options.include_usage:
        yield core.usage_chunk(rid, created, acc)


def _stream_completion(
    core: ModelCore, req: CompletionRequest, prompt: list[int], params: SamplingParams
) -> Iterator[CompletionResponse]:
    rid, created = new_id("cmpl"), now()
    acc = Accumulator(params.n, core.tokenizer, len(prompt))
    for event in _events(core, prompt, params, continues_prompt=True):
        logprob = acc.add(event)
        if event.text or event.finish_reason or logprob:
            yield completion_chunk(rid, created, core.model_id, event, logprob)
    if req.stream_options and req.stream_options.include_usage:
        yield core.completion_usage_chunk(rid, created, acc)


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


async def _on_worker(core: SpeechCore | TranscriptionCore, fn: Callable[[], T]) -> T:
    """`fn` run on an audio model's worker thread, awaited; a caller that goes away takes its
    call out of the queue if it has not started."""
    future = core.engine.submit(fn)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


class AsyncModel(_Routing):
    """`Model` for asyncio code: the same methods, awaited; streams are async iterators."""

    # ---- several models

    async def add_model(self, builder: ModelBuilder, alias: str | None = None) -> str:
        core = await asyncio.to_thread(builder._start, alias)
        try:
            self._models.add(core, builder)
        except BaseException:
            await asyncio.to_thread(core.engine.close)
            raise
        return core.model_id

    async def remove_model(self, model_id: str) -> None:
        core = self._models.remove(model_id)
        if core is not None:
            await asyncio.to_thread(core.engine.close)

    async def unload_model(self, model_id: str) -> None:
        await asyncio.to_thread(self._models.unload(model_id).engine.close)

    async def reload_model(self, model_id: str) -> None:
        await asyncio.to_thread(self._models.reload, model_id)

    # ---- text

    async def chat(
        self, text: str, *, model_id: str | None = None, session_id: str | None = None
    ) -> str:
        reply = await self.send_chat_request(text, model_id=model_id, session_id=session_id)
        return reply.choices[0].message.content or ""

    async def send_chat_request(
        self, request: ChatInput, *, model_id: str | None = None, session_id: str | None = None
    ) -> ChatCompletionResponse:
        core = self._models.text(model_id)
        req = _with_session(request, core, session_id)
        toolbox = self._models.toolbox
        if not toolbox.engaged(req):
            return await _async_chat_once(core, req)
        async with toolbox.holding_async(req.session_id):
            run = AgentRun(req, toolbox)
            while True:
                response = await _async_chat_once(core, run.request())
                calls = run.take(response)
                if calls:
                    run.record(calls, await asyncio.wrap_future(toolbox.run_calls(calls)))
                if run.done:
                    return run.finish(response)

    async def stream_chat_request(
        self, request: ChatInput, *, model_id: str | None = None, session_id: str | None = None
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        core, rid, created = self._models.text(model_id), new_id("chatcmpl"), now()
        req = _with_session(request, core, session_id)
        toolbox = self._models.toolbox
        if toolbox.engaged(req):
            async for chunk in _async_stream_agent(core, req, toolbox, AgentRun(req, toolbox)):
                yield chunk
            return
        req, prompt, params = core.prepare_chat(req)
        acc = core.chat_accumulator(req, prompt, params)
        for chunk in core.first_chunks(rid, created, params.n):
            yield chunk
        async for event in _async_events(core, prompt, params):
            logprob = acc.add(event)
            for chunk in acc.chat_chunks(rid, created, core.model_id, event, logprob):
                yield chunk
        if req.stream_options and req.stream_options.include_usage:
            yield core.usage_chunk(rid, created, acc)

    @overload
    async def generate_structured(
        self, schema: type[M], messages: ChatInput, *, model_id: str | None = None
    ) -> M: ...

    @overload
    async def generate_structured(
        self, schema: dict[str, Any], messages: ChatInput, *, model_id: str | None = None
    ) -> Any: ...

    async def generate_structured(
        self,
        schema: type[BaseModel] | dict[str, Any],
        messages: ChatInput,
        *,
        model_id: str | None = None,
    ) -> Any:
        req = structured_request(self._models.text(model_id).chat_request(messages), schema)
        return parse_structured(schema, await self.send_chat_request(req, model_id=model_id))

    async def send_completion_request(
        self, request: CompletionInput, *, model_id: str | None = None
    ) -> CompletionResponse:
        core = self._models.text(model_id)
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in _async_events(core, prompt, params, continues_prompt=True):
            acc.add(event)
        prefix = core.echo_prefix(req, prompt)
        return acc.completion_response(
            new_id("cmpl"), now(), core.model_id, params.logprobs, prefix
        )

    async def stream_completion_request(
        self, request: CompletionInput, *, model_id: str | None = None
    ) -> AsyncGenerator[CompletionResponse, None]:
        core, rid, created = self._models.text(model_id), new_id("cmpl"), now()
        req, prompt, params = core.prepare_completion(request)
        acc = Accumulator(params.n, core.tokenizer, len(prompt))
        async for event in _async_events(core, prompt, params, continues_prompt=True):
            logprob = acc.add(event)
            if event.text or event.finish_reason or logprob:
                yield completion_chunk(rid, created, core.model_id, event, logprob)
        if req.stream_options and req.stream_options.include_usage:
            yield core.completion_usage_chunk(rid, created, acc)

    async def send_raw_chat_request(
        self, request: ChatInput, *, model_id: str | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        core = self._models.text(model_id)
        _, prompt, _ = core.prepare_chat(request)
        logits = await asyncio.wrap_future(
            core.engine.run(functools.partial(core.engine.prompt_logits, prompt))
        )
        return logits, prompt

    async def logits_for(self, ids: list[int], *, model_id: str | None = None) -> torch.Tensor:
        return await asyncio.wrap_future(self._models.text(model_id).logits_for(ids))

    # ---- sessions, tools and their files: `Model`'s methods, awaited

    async def list_session_ids(self) -> list[str]:
        return self.toolbox.sessions.ids()

    async def export_session(self, session_id: str) -> str:
        return json.dumps(self.toolbox.sessions.export(session_id))

    async def import_session(self, data: str | bytes | dict[str, Any]) -> str:
        return self.toolbox.sessions.import_(data)

    async def delete_session(self, session_id: str) -> None:
        self.toolbox.sessions.delete(session_id)

    async def fork_session(self, source: str, dest: str, num_turns: int | None = None) -> None:
        self.toolbox.sessions.fork(source, dest, num_turns)

    async def list_mcp_tools(self) -> list[tuple[str, str]]:
        return self.toolbox.list_mcp_tools()

    async def find_file(self, file_id: str) -> StoredFile:
        return self.toolbox.find_file(file_id)

    # ---- embeddings

    async def generate_embeddings(
        self, request: EmbeddingInput, *, model_id: str | None = None
    ) -> list[list[float]]:
        response = await self.send_embedding_request(request, model_id=model_id)
        return [d.vector() for d in response.data]

    async def generate_embedding(self, text: str, *, model_id: str | None = None) -> list[float]:
        return (await self.generate_embeddings([text], model_id=model_id))[0]

    async def send_embedding_request(
        self, request: EmbeddingInput, *, model_id: str | None = None
    ) -> EmbeddingResponse:
        core = self._models.embedder(model_id)
        req = core.request(request)
        inputs = core.prepare(req)
        vectors = await asyncio.wrap_future(core.engine.submit(inputs))
        return core.response(req, inputs, vectors)

    # ---- speech (a text-to-speech voice)

    async def generate_speech(
        self,
        text: str,
        *,
        voice: str = "default",
        speed: float = 1.0,
        seed: int | None = None,
        model_id: str | None = None,
    ) -> SpeechOutput:
        core = self._models.voice(model_id)
        plan = core.plan(core.request(text, voice=voice, speed=speed, seed=seed))
        pieces = [await _on_worker(core, functools.partial(core.speak, plan, i)) for i in plan]
        return SpeechOutput(np.concatenate(pieces), core.voice.sample_rate, 1)

    async def send_speech_request(
        self, request: SpeechInput, *, model_id: str | None = None
    ) -> bytes:
        stream = await self.stream_speech_request(request, model_id=model_id)
        return b"".join([chunk async for chunk in stream])

    async def stream_speech_request(
        self, request: SpeechInput, *, model_id: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Awaiting it checks the request; iterating it speaks, sentence by sentence."""
        core = self._models.voice(model_id)
        plan = core.plan(core.request(request))
        encoder = core.encoder(plan.request)
        sse = plan.request.stream_format == "sse"

        async def chunks() -> AsyncGenerator[bytes, None]:
            for i in plan:
                audio = await _on_worker(core, functools.partial(core.speak, plan, i))
                piece = encoder.feed(audio)
                if piece:
                    yield audio_delta(piece) if sse else piece
            tail = await asyncio.to_thread(encoder.finish)  # mp3 and the like encode here
            if tail:
                yield audio_delta(tail) if sse else tail
            if sse:
                yield audio_done(plan)

        return chunks()

    # ---- transcription (a speech recognizer)

    async def transcribe(
        self,
        audio: AudioInput,
        *,
        sample_rate: int | None = None,
        language: str | None = None,
        timestamps: bool = False,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        model_id: str | None = None,
    ) -> VerboseTranscription:
        core = self._models.transcriber(model_id)
        form = core.form({"language": language, "prompt": prompt, "temperature": temperature})
        core.check_task(form, task)
        samples = await asyncio.to_thread(core.audio, audio, sample_rate)
        transcript = await _on_worker(core, lambda: core.run(samples, form, task, timestamps))
        return core.verbose(transcript, task)

    async def send_transcription_request(
        self,
        audio: AudioInput,
        fields: TranscriptionForm | dict[str, Any],
        *,
        task: str = "transcribe",
        model_id: str | None = None,
    ) -> tuple[str, str]:
        core = self._models.transcriber(model_id)
        form = core.form(fields)
        core.check_task(form, task)
        samples = await asyncio.to_thread(core.audio, audio)
        transcript = await _on_worker(core, lambda: core.run(samples, form, task))
        return core.response(transcript, form, task)

    # ---- tokens and facts

    async def tokenize(
        self,
        text_or_messages: str | list[dict[str, Any]] | TextMessages,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        model_id: str | None = None,
    ) -> list[int]:
        if isinstance(text_or_messages, str):  # any model's tokenizer
            tokenizer = self._models.tokenizer(model_id)
            return tokenizer.encode(text_or_messages, add_special_tokens)
        return self._models.text(model_id).tokenize(
            text_or_messages,
            tools=tools,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    async def detokenize(
        self, ids: list[int], *, skip_special_tokens: bool = False, model_id: str | None = None
    ) -> str:
        tokenizer = self._models.tokenizer(model_id)
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def config(self, model_id: str | None = None) -> ModelInfo:
        return self._models.get(model_id).info()

    async def max_sequence_length(self, model_id: str | None = None) -> int:
        return self._models.get(model_id).max_seq_len

    async def aclose(self) -> None:
        for core in self._models.cores():
            await asyncio.to_thread(core.engine.close)
        await asyncio.to_thread(self._close_toolbox)

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- the engine, and in-place quantization (ISQ): `Model`'s methods, off the event loop

    async def wait_until_compiled(
        self, timeout: float | None = None, *, model_id: str | None = None
    ) -> bool:
        """Wait until the compiled step serves (True), or it failed or is off (False)."""
        compiler = self._models.text(model_id).engine.compiler
        return compiler is not None and await asyncio.to_thread(compiler.wait, timeout)

    async def re_isq_model(self, ggml_type: str | int, model_id: str | None = None) -> str:
        core = self._models.text(model_id)
        return await asyncio.to_thread(core.quantizer.re_isq, str(ggml_type))

    async def begin_calibration(self, model_id: str | None = None) -> None:
        await asyncio.to_thread(self._models.text(model_id).quantizer.begin_calibration)

    async def calibration_status(self, model_id: str | None = None) -> dict[str, int]:
        return self._models.text(model_id).quantizer.calibration_status()

    async def apply_calibration(
        self, save_cimatrix: str | None = None, model_id: str | None = None
    ) -> str:
        quantizer = self._models.text(model_id).quantizer
        return await asyncio.to_thread(quantizer.apply_calibration, save_cimatrix)


async def _async_events(
    core: ModelCore, prompt: list[int], params: SamplingParams, continues_prompt: bool = False
) -> AsyncGenerator[TokenEvent, None]:
    sink = _AsyncSink()
    handle = core.engine.submit(prompt, params, sink, continues_prompt=continues_prompt)
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


async def _async_chat_once(
    core: ModelCore, request: ChatCompletionRequest
) -> ChatCompletionResponse:
    req, prompt, params = core.prepare_chat(request)
    acc = core.chat_accumulator(req, prompt, params)
    async for event in _async_events(core, prompt, params):
        acc.add(event)
    return acc.chat_response(new_id("chatcmpl"), now(), core.model_id, req.logprobs)


async def _async_stream_agent(
    core: ModelCore, req: ChatCompletionRequest, toolbox: Toolbox, run: AgentRun
) -> AsyncGenerator[ChatCompletionChunk, None]:
    """`_stream_agent`, awaiting the engine and the tools."""
    rid, created, model = new_id("chatcmpl"), now(), core.model_id
    async with toolbox.holding_async(req.session_id):
        while True:
            round_req, prompt, params = core.prepare_chat(run.request())
            if run.round == 0:
                for chunk in core.first_chunks(rid, created, 1):
                    yield chunk
            acc = core.chat_accumulator(round_req, prompt, params)
            async for event in _async_events(core, prompt, params):
                logprob = acc.add(event)
                for chunk in acc.chat_chunks(rid, created, model, event, logprob):
                    if (passed := run.passes(chunk)) is not None:
                        yield passed
            response = acc.chat_response(rid, created, model, round_req.logprobs)
            calls = run.take(response)
            if calls:
                for chunk in run.event_chunks(run.started_events(), rid, created, model):
                    yield chunk
                made = run.record(calls, await asyncio.wrap_future(toolbox.run_calls(calls)))
                for chunk in run.event_chunks(made, rid, created, model):
                    yield chunk
            if run.done:
                break
        for chunk in run.final_chunks(response, rid, created, model):
            yield chunk
    if req.stream_options and req.stream_options.include_usage:
        yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=run.usage)
