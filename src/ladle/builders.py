"""Model builders with mistral.rs's names: `TextModelBuilder`, `GgufModelBuilder`,
`EmbeddingModelBuilder`, `SpeechModelBuilder`, `TranscriptionModelBuilder` and
`MultiModelBuilder`.

A builder collects options with chained `with_*` calls and loads on `build()` (blocking,
returns `Model`) or `await build_async()` (loads on a worker thread, returns `AsyncModel`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from ladle import envconfig
from ladle.cores.embedding import EmbeddingCore
from ladle.cores.speech import SpeechCore
from ladle.cores.text import ModelCore
from ladle.cores.transcription import DEFAULT_MAX_AUDIO_SECONDS, TranscriptionCore
from ladle.devices import cgroup_cpu_quota
from ladle.engine.embedding_loader import LoadedEmbedder, load_embedder
from ladle.engine.kernels import native
from ladle.engine.kv_cache import DEFAULT_KV_CACHE_DTYPE, parse_kv_cache_dtype
from ladle.engine.loader import LoadedModel, load_model
from ladle.engine.quant.isq import parse_isq_type
from ladle.errors import InvalidRequestError, ModelLoadError
from ladle.model import AsyncModel, Core, Model, ModelBuilder, Models
from ladle.store.catalog import resolve
from ladle.tools.callbacks import ServerTool, tool_callback
from ladle.tools.mcp import McpClientConfig
from ladle.tools.runtime import DEFAULT_MAX_TOOL_ROUNDS, DEFAULT_TOOL_TIMEOUT_SECS, Toolbox
from ladle.tools.sessions import SessionLimits

if TYPE_CHECKING:
    from ladle.engine.speech import LoadedVoice
    from ladle.engine.transcriber import LoadedWhisper

_DTYPES = {
    "auto": torch.float32,
    "f32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "f16": torch.float16,
    "float16": torch.float16,
}


def available_cores() -> int:
    """torch's default (the physical cores), within the CPUs this process may run on
    (`taskset`, a container's cpuset) and its cgroup's CPU quota rounded up (`docker run
    --cpus`): torch ignores both."""
    if hasattr(os, "sched_getaffinity"):
        allowed = len(os.sched_getaffinity(0))
    else:
        allowed = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        allowed = min(allowed, math.ceil(quota))
    return max(1, min(torch.get_num_threads(), allowed))


class _AgentOptions:
    """What every builder offers for the agent runtime: tool callbacks, MCP servers, sessions.

    Each built `Model` gets a `Toolbox` of its own from these, unless `with_toolbox` shares
    one (a service shares one between all its models)."""

    def __init__(self) -> None:
        self._callbacks: list[ServerTool] = []
        self._mcp: McpClientConfig | None = None
        self._max_tool_rounds = DEFAULT_MAX_TOOL_ROUNDS
        self._tool_timeout_secs: float | None = DEFAULT_TOOL_TIMEOUT_SECS
        self._sessions_path: Path | None = None
        self._session_limits: SessionLimits | None = None
        self._shared_toolbox: Toolbox | None = None

    def with_tool_callback(
        self,
        name: str | ServerTool,
        fn: Callable[..., Any] | None = None,
        *,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Self:
        """A Python function the model may call; ladle runs it and feeds the result back.

        `with_tool_callback("weather", get_weather)` takes the JSON schema of the arguments
        from the function's type hints and its description from the docstring (or pass
        `description=` and `parameters=`); `with_tool_callback(fn)` takes a function made
        by the `@ladle.tool` decorator whole. Sync functions run on a worker thread, async
        ones on the tool loop.
        """
        if isinstance(name, ServerTool):
            self._callbacks.append(name)
        else:
            if fn is None:
                raise InvalidRequestError(f"tool {name!r} needs a function", param="fn")
            self._callbacks.append(tool_callback(name, fn, description, parameters))
        return self

    def with_mcp_client(self, config: McpClientConfig) -> Self:
        """Connect these MCP servers when the model is built; their tools are offered to the
        model (`auto_register_tools`) and run through them."""
        self._mcp = config
        return self

    def with_max_tool_rounds(self, rounds: int) -> Self:
        """Rounds of server-side tool calls per request, at most (a request's
        `max_tool_rounds` overrides it)."""
        if rounds < 0:
            raise InvalidRequestError("must be >= 0", "max_tool_rounds")
        self._max_tool_rounds = rounds
        return self

    def with_tool_timeout_secs(self, seconds: float | None) -> Self:
        """How long a tool callback may run before the model is told it timed out (None:
        no limit). MCP tools follow their `McpClientConfig.tool_timeout_secs`."""
        if seconds is not None and seconds <= 0:
            raise InvalidRequestError("must be positive", "tool_timeout_secs")
        self._tool_timeout_secs = seconds
        return self

    def with_sessions(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_sessions: int = 128,
        idle_ttl_secs: float | None = 1800.0,
        max_bytes: int = 256 << 20,
    ) -> Self:
        """Where sessions live: an SQLite file that outlives the process (None: memory, as
        by default), and how many are kept."""
        self._sessions_path = None if path is None else Path(path).expanduser()
        self._session_limits = SessionLimits(max_sessions, idle_ttl_secs, max_bytes)
        return self

    def with_toolbox(self, toolbox: Toolbox) -> Self:
        """Share a started `Toolbox` (tools, sessions, files) with other models; its owner
        closes it. The other agent options are then ignored."""
        self._shared_toolbox = toolbox
        return self

    def _toolbox(self) -> tuple[Toolbox, bool]:
        """The toolbox to serve with, started, and whether the new `Model` owns it."""
        if self._shared_toolbox is not None:
            return self._shared_toolbox, False
        toolbox = Toolbox(
            self._callbacks,
            self._mcp,
            db_path=self._sessions_path,
            session_limits=self._session_limits,
            max_tool_rounds=self._max_tool_rounds,
            tool_timeout_secs=self._tool_timeout_secs,
        )
        try:
            toolbox.start()
        except BaseException:
            toolbox.close()
            raise
        return toolbox, True


class _ModelOptions:
    """What every builder sets: the model's path or alias, its name, its threads and dtype."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model_id: str | None = None
        self.num_threads: int | None = None
        self.dtype: torch.dtype = torch.float32

    def with_model_id(self, model_id: str) -> Self:
        """The name responses carry in their `model` field (default: the file or folder name)."""
        self.model_id = model_id
        return self

    def with_num_threads(self, num_threads: int) -> Self:
        """CPU threads for the model's kernels (default: the cores this process may use)."""
        if num_threads < 1:
            raise InvalidRequestError("must be >= 1", "num_threads")
        self.num_threads = num_threads
        return self

    def with_dtype(self, dtype: str | torch.dtype) -> Self:
        """Compute dtype: "auto" (float32 on CPU), "f32", "bf16" or "f16"."""
        if isinstance(dtype, torch.dtype):
            self.dtype = dtype
        elif dtype in _DTYPES:
            self.dtype = _DTYPES[dtype]
        else:
            raise InvalidRequestError(f"unknown dtype {dtype!r} ({', '.join(_DTYPES)})", "dtype")
        return self

    def with_logging(self) -> Self:
        logging.basicConfig(level=logging.INFO)
        return self


class _Builder(_AgentOptions, _ModelOptions):
    def __init__(self, path: Path) -> None:
        _AgentOptions.__init__(self)
        _ModelOptions.__init__(self, path)
        self.device = "cpu"
        self.max_num_seqs = 16
        self.max_seq_len: int | None = None
        self.kv_cache_tokens: int | None = None
        self.kv_cache_dtype = DEFAULT_KV_CACHE_DTYPE
        self.chat_template: str | None = None
        self.tokenizer_path: str | None = None
        self.isq: str | None = None
        self.imatrix: str | None = None
        self.compile = envconfig.compile_models()

    def with_device(self, device: str) -> Self:
        if device != "cpu":
            raise InvalidRequestError(
                f"device {device!r} is not supported yet (use 'cpu')", "device"
            )
        self.device = device
        return self

    def with_max_num_seqs(self, max_num_seqs: int) -> Self:
        if max_num_seqs < 1:
            raise InvalidRequestError("must be >= 1", "max_num_seqs")
        self.max_num_seqs = max_num_seqs
        return self

    def with_kv_cache_tokens(self, kv_cache_tokens: int) -> Self:
        """The KV cache budget in tokens, shared by all running sequences (mistral.rs's
        `ContextSize`); by default one full context. A sequence longer than it cannot run,
        so it also caps the context."""
        if kv_cache_tokens < 2:
            raise InvalidRequestError("must be >= 2", "kv_cache_tokens")
        self.kv_cache_tokens = kv_cache_tokens
        return self

    def with_kv_cache_dtype(self, dtype: str | torch.dtype) -> Self:
        """What the engine's paged KV cache stores keys and values in: "f16" (the default, as
        llama.cpp: half the memory of "f32" and faster decoding, for a rounding far below the
        weights' quantization) or "f32", whatever the compute dtype."""
        try:
            self.kv_cache_dtype = parse_kv_cache_dtype(dtype)
        except ValueError as e:
            raise InvalidRequestError(str(e), "kv_cache_dtype") from e
        return self

    def with_max_seq_len(self, max_seq_len: int) -> Self:
        """Cap the context below the model's own (saves KV memory)."""
        if max_seq_len < 2:
            raise InvalidRequestError("must be >= 2", "max_seq_len")
        self.max_seq_len = max_seq_len
        return self

    def with_chat_template(self, template: str) -> Self:
        """Override the chat template: Jinja text, a `.jinja` file or a tokenizer_config.json."""
        self.chat_template = template
        return self

    def with_tokenizer_json(self, folder: str) -> Self:
        """Use the tokenizer in this folder instead of the model's own."""
        self.tokenizer_path = folder
        return self

    def with_isq(self, isq_type: str | int) -> Self:
        """Quantize the linear layers as they load (in-situ quantization).

        Types as mistral.rs names them: Q4_0, Q4_1, Q4K, Q5K, Q6K, Q8_0, HQQ4, HQQ8, F16, BF16
        (case-insensitive), or bits: 4 (Q4K), 5, 6, 8 (Q8_0). Embeddings and the output
        head keep their precision.
        """
        try:
            self.isq = parse_isq_type(isq_type)
        except ValueError as e:
            raise InvalidRequestError(str(e), "isq") from e
        return self

    def with_imatrix(self, path: str | os.PathLike[str]) -> Self:
        """Weight ISQ's error by an importance matrix: llama.cpp's `imatrix.dat` or GGUF
        imatrix, or a `.cimatrix` saved by `apply_calibration`. Needs `with_isq`."""
        self.imatrix = str(Path(path).expanduser())
        return self

    def _check_isq(self) -> None:
        if self.imatrix is not None and self.isq is None:
            raise InvalidRequestError(
                "with_imatrix needs with_isq (the type to quantize to)", "imatrix"
            )

    def with_compile(self, enabled: bool | None = True) -> Self:
        """Compile the model's step with `torch.compile` in the background, serving eagerly
        until it is ready (one to three minutes). None, the default (`LADLE_COMPILE`), compiles
        only a model that the native layer kernels cannot run: with them, the eager step
        decodes faster than a compiled one and the compiler's ~180 MB stay out of the
        process."""
        self.compile = enabled
        return self

    def _start(self, model_id: str | None = None) -> ModelCore | EmbeddingCore:
        """Load the model and start its engine, named `model_id` (default: the builder's)."""
        self._check_isq()
        return ModelCore.start(
            self._load,
            model_id or self.model_id or self.path.name,
            self.max_num_seqs,
            self.max_seq_len,
            self.kv_cache_tokens,
            self.compile,
            self.kv_cache_dtype,
        )

    def _load(self) -> LoadedModel:
        # on the thread that will run the model: OpenMP's thread count is per calling thread,
        # and so is the native kernels'
        threads = self.num_threads or available_cores()
        torch.set_num_threads(threads)
        native.set_num_threads(threads)
        return load_model(
            self.path,
            dtype=self.dtype,
            chat_template=self.chat_template,
            tokenizer_path=self.tokenizer_path,
            isq=self.isq,
            imatrix=self.imatrix,
        )

    def build(self) -> Model:
        """Load the model and start its engine (and connect its MCP servers)."""
        core = self._start()
        try:
            toolbox, owned = self._toolbox()
        except BaseException:
            core.engine.close()
            raise
        return Model(Models.of(core, self, toolbox, owned))

    async def build_async(self) -> AsyncModel:
        """Load the model on a worker thread and return its asyncio interface."""
        core = await asyncio.to_thread(self._start)
        try:
            toolbox, owned = await asyncio.to_thread(self._toolbox)
        except BaseException:
            await asyncio.to_thread(core.engine.close)
            raise
        return AsyncModel(Models.of(core, self, toolbox, owned))


class TextModelBuilder(_Builder):
    """Build a text model from a local path (a Hugging Face safetensors folder or a GGUF file)
    or a catalog alias or id (`"smollm2-135m-instruct"`: the cached model, fetched once)."""

    def __init__(self, model_id_or_path: str | os.PathLike[str]) -> None:
        super().__init__(Path(model_id_or_path).expanduser())

    def _start(self, model_id: str | None = None) -> ModelCore | EmbeddingCore:
        if not self.path.exists() and len(self.path.parts) == 1:  # a bare name: the catalog's
            self.path = resolve(str(self.path))
        return super()._start(model_id)


class GgufModelBuilder(_Builder):
    """Build a text model from GGUF: a folder and the file(s) in it, or a file path."""

    def __init__(
        self, path_or_dir: str | os.PathLike[str], files: str | list[str] | None = None
    ) -> None:
        base = Path(path_or_dir).expanduser()
        names = [files] if isinstance(files, str) else list(files or [])
        if len(names) > 1:
            raise ModelLoadError(base, "split GGUF files (several parts) are not supported yet")
        super().__init__(base / names[0] if names else base)


class EmbeddingModelBuilder(_Builder):
    """Build an embedding model from a local path or a catalog alias (downloaded if needed).

    A Hugging Face folder (BERT / RoBERTa / XLM-R with sentence-transformers metadata, or a
    decoder embedder such as Qwen3-Embedding) or a GGUF file. `with_max_num_seqs` bounds the
    inputs per forward; `with_max_seq_len` caps the longest input below the model's own.
    """

    def __init__(self, path_or_alias: str | os.PathLike[str]) -> None:
        super().__init__(Path(path_or_alias).expanduser())
        self.max_num_seqs = 32

    def _start(self, model_id: str | None = None) -> EmbeddingCore:
        self._check_isq()
        self.path = resolve(str(self.path))
        return EmbeddingCore.start(
            self._load_embedder,
            model_id or self.model_id or self.path.name,
            self.max_num_seqs,
            self.max_seq_len,
        )

    def _load_embedder(self) -> LoadedEmbedder:
        torch.set_num_threads(self.num_threads or available_cores())
        return load_embedder(
            self.path,
            dtype=self.dtype,
            max_num_seqs=self.max_num_seqs,
            tokenizer_path=self.tokenizer_path,
            isq=self.isq,
            imatrix=self.imatrix,
        )


class _AudioBuilder(_ModelOptions, ABC):
    """What the audio builders share. An audio model runs one request's work at a time on
    its own thread (no KV cache, no batching), so it has none of the text builders' engine
    settings."""

    def __init__(self, path_or_alias: str | os.PathLike[str]) -> None:
        super().__init__(Path(path_or_alias).expanduser())

    @abstractmethod
    def _start(self, model_id: str | None = None) -> SpeechCore | TranscriptionCore:
        """Load the model and start its worker, named `model_id` (default: the builder's)."""

    def _threads(self) -> None:
        torch.set_num_threads(self.num_threads or available_cores())

    def build(self) -> Model:
        """Load the model and start its worker thread."""
        return Model(Models.of(self._start(), self))

    async def build_async(self) -> AsyncModel:
        """Load the model on a worker thread and return its asyncio interface."""
        return AsyncModel(Models.of(await asyncio.to_thread(self._start), self))


class SpeechModelBuilder(_AudioBuilder):
    """Build a text-to-speech voice from a local path (a Piper voice: its `.onnx` with the
    `.onnx.json` beside it, or their folder) or a catalog alias (`"piper-en-us-joe-medium"`,
    fetched once). Speaking needs espeak-ng (`apt-get install espeak-ng`) for phonemes."""

    def _start(self, model_id: str | None = None) -> SpeechCore:
        self.path = resolve(str(self.path))
        return SpeechCore.start(self._load, model_id or self.model_id or self.path.name)

    def _load(self) -> LoadedVoice:
        from ladle.engine.speech import load_voice  # reads ONNX: imported when a voice loads

        self._threads()
        return load_voice(self.path, dtype=self.dtype)


class TranscriptionModelBuilder(_AudioBuilder):
    """Build a speech recognizer from a local path (a Whisper model as CTranslate2 saves it:
    `model.bin`, `config.json`, `tokenizer.json`, as faster-whisper uses) or a catalog alias
    (`"whisper-tiny-en"`, fetched once)."""

    def __init__(self, path_or_alias: str | os.PathLike[str]) -> None:
        super().__init__(path_or_alias)
        self.max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS

    def with_max_audio_seconds(self, seconds: float | None) -> Self:
        """The longest audio a request may bring (default 4 hours; None: no limit)."""
        if seconds is not None and seconds <= 0:
            raise InvalidRequestError("must be positive", "max_audio_seconds")
        self.max_audio_seconds = seconds
        return self

    def _start(self, model_id: str | None = None) -> TranscriptionCore:
        self.path = resolve(str(self.path))
        return TranscriptionCore.start(
            self._load, model_id or self.model_id or self.path.name, self.max_audio_seconds
        )

    def _load(self) -> LoadedWhisper:
        from ladle.engine.transcriber import load_whisper  # imported when a model loads

        self._threads()
        return load_whisper(self.path, dtype=self.dtype)


class MultiModelBuilder(_AgentOptions):
    """Several models behind one `Model` (mistral.rs's `MultiModelBuilder`): each is loaded by
    its own builder and keeps its own engine and thread; a call picks one with `model_id=`, or
    goes to the default (the first added, unless `with_default_model` names another). Tools,
    MCP servers and sessions are set here, once for all of them."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: list[tuple[ModelBuilder, str | None]] = []
        self._default: str | None = None

    def add_model(self, builder: ModelBuilder, alias: str | None = None) -> Self:
        """Add a model, known by `alias` (default: the builder's model id, or its file name)."""
        self._entries.append((builder, alias))
        return self

    def with_default_model(self, model_id: str) -> Self:
        self._default = model_id
        return self

    def build(self) -> Model:
        """Load every model in turn; if one fails, those already loaded are closed again."""
        cores: list[Core] = []
        try:
            for builder, alias in self._entries:
                cores.append(builder._start(alias))
            return Model(self._registry(cores, *self._toolbox()))
        except BaseException:
            for core in cores:
                core.engine.close()
            raise

    async def build_async(self) -> AsyncModel:
        """`build`, each model loaded on a worker thread; returns the asyncio interface."""
        cores: list[Core] = []
        try:
            for builder, alias in self._entries:
                cores.append(await asyncio.to_thread(builder._start, alias))
            toolbox, owned = await asyncio.to_thread(self._toolbox)
            return AsyncModel(self._registry(cores, toolbox, owned))
        except BaseException:
            for core in cores:
                await asyncio.to_thread(core.engine.close)
            raise

    def _registry(self, cores: list[Core], toolbox: Toolbox, owned: bool) -> Models:
        if not cores:
            raise InvalidRequestError("MultiModelBuilder has no models: call add_model first")
        models = Models(toolbox, owned)
        for core, (builder, _) in zip(cores, self._entries, strict=True):
            models.add(core, builder)  # two models under one id: an error naming it
        if self._default is not None:
            models.set_default(self._default)
        return models
