"""Request builders with mistral.rs's names: `TextMessages`, `RequestBuilder` and
`EmbeddingRequestBuilder`.

`TextMessages` is a plain conversation sampled greedily; `RequestBuilder` adds sampling,
logprobs, tools and truncation. Both turn into one `ChatCompletionRequest`, the same type the
HTTP service receives, so there is one path from any request shape to the engine.
"""

from __future__ import annotations

import enum
from typing import Any

from ladle.errors import InvalidRequestError
from ladle.protocol.openai import ChatCompletionRequest, Constraint, EmbeddingRequest, parse_request


class TextMessageRole(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    TOOL = "tool"


def _role(role: TextMessageRole | str) -> str:
    try:
        return TextMessageRole(role).value
    except ValueError:
        roles = ", ".join(r.value for r in TextMessageRole)
        raise InvalidRequestError(f"unknown role {role!r} (use {roles})", param="role") from None


class TextMessages:
    """A conversation; sent as is, it is decoded greedily (deterministic), as in mistral.rs."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.thinking: bool | None = None

    def add_message(self, role: TextMessageRole | str, text: str) -> TextMessages:
        self.messages.append({"role": _role(role), "content": text})
        return self

    def clear(self) -> TextMessages:
        self.messages.clear()
        return self

    def enable_thinking(self, enable: bool) -> TextMessages:
        self.thinking = enable
        return self

    def to_request(self) -> ChatCompletionRequest:
        return parse_request(
            ChatCompletionRequest,
            {"messages": self.messages, "temperature": 0.0, "enable_thinking": self.thinking},
        )


class RequestBuilder:
    """A chat request with full control of sampling; starts deterministic (greedy)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fields: dict[str, Any] = {"temperature": 0.0}

    @classmethod
    def from_messages(cls, messages: TextMessages) -> RequestBuilder:
        builder = cls()
        builder.messages = list(messages.messages)
        if messages.thinking is not None:
            builder.fields["enable_thinking"] = messages.thinking
        return builder

    def add_message(self, role: TextMessageRole | str, text: str) -> RequestBuilder:
        self.messages.append({"role": _role(role), "content": text})
        return self

    def add_tool_message(self, tool_content: str, tool_id: str) -> RequestBuilder:
        self.messages.append({"role": "tool", "content": tool_content, "tool_call_id": tool_id})
        return self

    def add_message_with_tool_call(
        self, role: TextMessageRole | str, text: str, tool_calls: list[dict[str, Any]]
    ) -> RequestBuilder:
        message = {"role": _role(role), "content": text, "tool_calls": tool_calls}
        self.messages.append(message)
        return self

    def set_tools(self, tools: list[dict[str, Any]]) -> RequestBuilder:
        return self._set("tools", tools)

    def set_tool_choice(self, tool_choice: str | dict[str, Any]) -> RequestBuilder:
        """`"auto"` (the default with tools), `"none"`, `"required"`, or
        `{"type": "function", "function": {"name": ...}}`; the last two force a call, whose
        arguments then always follow the function's parameters."""
        return self._set("tool_choice", tool_choice)

    def set_parallel_tool_calls(self, parallel: bool) -> RequestBuilder:
        """False: at most one call per reply."""
        return self._set("parallel_tool_calls", parallel)

    def set_constraint(self, constraint: Constraint | dict[str, Any] | None) -> RequestBuilder:
        """Constrain the reply: a `Constraint` (`Constraint.json_schema(Model)`, `.regex`,
        `.lark`, `.json_object()`), its `{"type", "value"}` dict, or None for free text."""
        return self._set("grammar", constraint)

    def return_logprobs(self, return_logprobs: bool) -> RequestBuilder:
        return self._set("logprobs", return_logprobs)

    def set_deterministic_sampler(self) -> RequestBuilder:
        self.fields = {k: v for k, v in self.fields.items() if k not in _SAMPLER_FIELDS}
        return self._set("temperature", 0.0)

    def set_sampler_temperature(self, temperature: float) -> RequestBuilder:
        return self._set("temperature", temperature)

    def set_sampler_topk(self, top_k: int) -> RequestBuilder:
        return self._set("top_k", top_k)

    def set_sampler_topp(self, top_p: float) -> RequestBuilder:
        return self._set("top_p", top_p)

    def set_sampler_minp(self, min_p: float) -> RequestBuilder:
        return self._set("min_p", min_p)

    def set_sampler_topn_logprobs(self, top_n: int) -> RequestBuilder:
        return self._set("top_logprobs", top_n)

    def set_sampler_frequency_penalty(self, penalty: float) -> RequestBuilder:
        return self._set("frequency_penalty", penalty)

    def set_sampler_presence_penalty(self, penalty: float) -> RequestBuilder:
        return self._set("presence_penalty", penalty)

    def set_sampler_repetition_penalty(self, penalty: float) -> RequestBuilder:
        return self._set("repetition_penalty", penalty)

    def set_sampler_stop_toks(self, stop: list[str]) -> RequestBuilder:
        return self._set("stop", stop)

    def set_sampler_max_len(self, max_len: int) -> RequestBuilder:
        return self._set("max_tokens", max_len)

    def set_sampler_logits_bias(self, bias: dict[int, float]) -> RequestBuilder:
        return self._set("logit_bias", bias)

    def set_sampler_n_choices(self, n: int) -> RequestBuilder:
        return self._set("n", n)

    def set_sampler_seed(self, seed: int) -> RequestBuilder:
        return self._set("seed", seed)

    def enable_thinking(self, enable: bool) -> RequestBuilder:
        return self._set("enable_thinking", enable)

    def with_truncate_sequence(self, truncate: bool) -> RequestBuilder:
        return self._set("truncate_sequence", truncate)

    def _set(self, key: str, value: Any) -> RequestBuilder:
        self.fields[key] = value
        return self

    def to_request(self) -> ChatCompletionRequest:
        return parse_request(ChatCompletionRequest, {"messages": self.messages, **self.fields})


_SAMPLER_FIELDS = frozenset(
    {
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "stop",
        "max_tokens",
        "logit_bias",
        "seed",
    }
)


class EmbeddingRequestBuilder:
    """Inputs to embed, as text or as token ids; one vector comes back per input, in order."""

    def __init__(self) -> None:
        self.inputs: list[str | list[int]] = []
        self.truncate_sequence = False

    def add_prompt(self, text: str) -> EmbeddingRequestBuilder:
        self.inputs.append(text)
        return self

    def add_prompts(self, texts: list[str]) -> EmbeddingRequestBuilder:
        self.inputs.extend(texts)
        return self

    def add_tokens(self, token_ids: list[int]) -> EmbeddingRequestBuilder:
        self.inputs.append(list(token_ids))
        return self

    def with_truncate_sequence(self, truncate: bool) -> EmbeddingRequestBuilder:
        """Cut inputs longer than the model's maximum instead of raising `ContextLengthError`."""
        self.truncate_sequence = truncate
        return self

    def to_request(self) -> EmbeddingRequest:
        return parse_request(
            EmbeddingRequest, {"input": self.inputs, "truncate_sequence": self.truncate_sequence}
        )
