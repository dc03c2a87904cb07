"""What `Model` and `AsyncModel` share: every rule that does no waiting.

How any accepted request shape becomes a validated request, a prompt that fits the context and
sampling parameters; how a conversation is rendered and tokenized; what `config()` reports.
The two API classes differ only in how they wait for the engine's events.
"""

from __future__ import annotations

import atexit
import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ladle.cores.responses import Accumulator
from ladle.cores.structured import reply_check, request_grammar
from ladle.engine.engine import EngineConfig, LLMEngine
from ladle.engine.grammar import GrammarCompiler
from ladle.engine.kv_cache import DEFAULT_KV_CACHE_DTYPE
from ladle.engine.loader import LoadedModel
from ladle.engine.loading.chat_template import (
    render_chat_template,
    template_capabilities,
    validate_messages,
)
from ladle.engine.models.base import CausalLM
from ladle.engine.quant.live import LiveQuantizer
from ladle.engine.sampling import SamplingParams
from ladle.errors import ContextLengthError, InvalidRequestError
from ladle.messages import RequestBuilder, TextMessages
from ladle.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    parse_request,
)
from ladle.tools.formats import model_tool_format, template_messages
from ladle.tools.parser import tool_parsing

ChatInput = (
    str
    | list[dict[str, Any]]
    | dict[str, Any]
    | TextMessages
    | RequestBuilder
    | ChatCompletionRequest
)
CompletionInput = str | list[int] | CompletionRequest | dict[str, Any]

# max_tokens of a constrained request that sets none: a schema with no bound on its length
# (an array without maxItems, a free string) lets a small model loop to the end of the context,
# minutes on a CPU; the cap ends it with finish_reason "length" instead
CONSTRAINED_MAX_TOKENS = 2048


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


class _Engine(Protocol):
    def close(self) -> None: ...


class _HasEngine(Protocol):
    @property
    def engine(self) -> _Engine: ...


Core = TypeVar("Core", bound=_HasEngine)

# Engines whose models were never closed. Their threads are daemons: left running into the
# interpreter's teardown, one inside torch aborts the process ("terminate called without an
# active exception", exit code 134), so they are stopped first, while Python still runs.
_open_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        engine.close()


SCORE_CHUNK_SIZE = 512  # tokens per forward in `sequence_logits`: bounds attention memory


def start_on_own_thread(make: Callable[[], Core], serve: Callable[[Core], None], name: str) -> Core:
    """Build a model's core on a new thread, which then serves it; wait until it is built.

    All of a model's torch work stays on that one thread because torch's OpenMP kernels
    run about 2x slower on a thread other than the first one to use them while that
    first thread's pool lives (SmolLM2 decode step measured 14 ms on the loading thread,
    27-32 ms on another).
    """
    ready: Future[Core] = Future()

    def main() -> None:
        try:
            core = make()
        except BaseException as e:  # handed to the caller waiting on `ready`
            ready.set_exception(e)
            return
        ready.set_result(core)
        serve(core)

    threading.Thread(target=main, name=name, daemon=True).start()
    core = ready.result()
    _open_engines.add(core.engine)
    return core


@torch.inference_mode()
def sequence_logits(model: CausalLM, kv_dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    """Logits after every token of `ids` (float32 `[len(ids), vocab]`), from one new cache
    storing keys and values in `kv_dtype` (the engine's, so scores are what serving computes).

    Runs the model directly, chunk by chunk as a prefill does, on the engine's thread
    (`engine.run`): the scheduler's own sequences are left as they are, and wait for it.
    """
    cache = model.new_cache(kv_dtype)
    tokens = torch.tensor(ids, dtype=torch.long)
    out: torch.Tensor | None = None
    for start in range(0, len(ids), SCORE_CHUNK_SIZE):
        part = tokens[start : start + SCORE_CHUNK_SIZE]
        logits = model(part, torch.arange(start, start + len(part)), cache)
        if out is None:  # allocated once: no second [T, vocab] copy as torch.cat would make
            out = torch.empty(len(ids), logits.shape[-1], dtype=torch.float32)
        out[start : start + len(part)] = logits
    assert out is not None  # ids is never empty here: `ModelCore.logits_for` checks
    return out


class ModelCore:
    """Request and response rules shared by `Model` and `AsyncModel` (no waiting here)."""

    def __init__(
        self,
        loaded: LoadedModel,
        model_id: str,
        max_num_seqs: int,
        max_seq_len: int | None,
        kv_cache_tokens: int | None = None,
        compile: bool | None = False,
        kv_cache_dtype: torch.dtype = DEFAULT_KV_CACHE_DTYPE,
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id
        context = loaded.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len, context) if max_seq_len else context
        self.engine = LLMEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(
                self.max_seq_len,
                loaded.dtype,
                max_num_seqs,
                kv_cache_tokens=kv_cache_tokens,
                compile=compile,
                kv_cache_dtype=kv_cache_dtype,
            ),
        )
        self.max_seq_len = self.engine.config.max_seq_len  # a KV budget below it caps it
        self.grammars = GrammarCompiler(loaded.tokenizer)
        self.tool_format = model_tool_format(loaded.tokenizer)

    @classmethod
    def start(
        cls,
        load: Callable[[], LoadedModel],
        model_id: str,
        max_num_seqs: int,
        max_seq_len: int | None,
        kv_cache_tokens: int | None = None,
        compile: bool | None = False,
        kv_cache_dtype: torch.dtype = DEFAULT_KV_CACHE_DTYPE,
    ) -> ModelCore:
        """Load the model on a new thread, which then runs its engine; wait until loaded."""
        return start_on_own_thread(
            lambda: cls(
                load(),
                model_id,
                max_num_seqs,
                max_seq_len,
                kv_cache_tokens,
                compile,
                kv_cache_dtype,
            ),
            lambda core: core.engine.serve(),
            f"ladle-engine[{model_id}]",
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
        checked = validate_messages(messages)
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in checked):
            capabilities = template_capabilities(template)
            checked = template_messages(capabilities, self.tool_format, checked, tools)
        return render_chat_template(
            template,
            checked,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            **kwargs,
        )

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt ids; tools are shown to the template even under `tool_choice` `none`,
        as OpenAI and transformers do: earlier calls in the conversation refer to them."""
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        text = self.render_chat(
            [m.to_template_dict() for m in req.messages],
            tools=tools,
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
        self.check_token_ids(req.prompt, "prompt")
        return list(req.prompt)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param=param)

    def logits_for(self, ids: list[int]) -> Future[torch.Tensor]:
        """Logits after every token of `ids` (float32 `[len(ids), vocab]`), computed on the
        engine thread; row `i` scores the token that would follow `ids[: i + 1]`."""
        if not ids:
            raise InvalidRequestError("needs at least one token id", param="ids")
        if len(ids) > self.max_seq_len:
            raise ContextLengthError(
                f"{len(ids)} tokens exceed the model's context of {self.max_seq_len}", param="ids"
            )
        self.check_token_ids(ids, "ids")
        model, kv_dtype = self.loaded.model, self.engine.config.kv_cache_dtype
        return self.engine.run(lambda: sequence_logits(model, kv_dtype, ids))

    def sampling(
        self, req: ChatCompletionRequest | CompletionRequest, logprobs: bool, top: int
    ) -> SamplingParams:
        grammar = request_grammar(self.grammars, req, self.tool_format)
        max_tokens = req.token_limit()
        return SamplingParams(
            max_tokens=CONSTRAINED_MAX_TOKENS if max_tokens is None and grammar else max_tokens,
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
            grammar=grammar,
        )

    def prepare_chat(
        self, request: ChatInput
    ) -> tuple[ChatCompletionRequest, list[int], SamplingParams]:
        """The validated request, its prompt as it will run, and its sampling parameters."""
        req = self.chat_request(request)
        req.check_tool_choice()
        params = self.sampling(req, req.logprobs, req.top_logprobs or 0)
        return req, self.engine.fit_prompt(self.chat_prompt(req), params), params

    def chat_accumulator(
        self, req: ChatCompletionRequest, prompt: list[int], params: SamplingParams
    ) -> Accumulator:
        """Collects the reply's events, reading tool calls out of it when tools are offered
        and checking it against the schemas its grammar did not wholly enforce."""
        parsing = tool_parsing(req, self.tool_format)
        check = reply_check(self.grammars, req)
        return Accumulator(params.n, self.tokenizer, len(prompt), parsing, check)

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

    def completion_usage_chunk(
        self, rid: str, created: int, acc: Accumulator
    ) -> CompletionResponse:
        return CompletionResponse(
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

    # ---- in-place quantization (ISQ)

    @functools.cached_property
    def quantizer(self) -> LiveQuantizer:
        """Re-ISQ and calibration of this model while its engine serves."""
        return LiveQuantizer(self.loaded, self.engine.run)
