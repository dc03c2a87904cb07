"""Render a model's chat template into a prompt, the way Hugging Face's `apply_chat_template` does.

Templates are Jinja programs shipped with the weights, so they run in a sandbox with the same
environment, filters and variables transformers gives them: a template written for
transformers renders here to the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ladle.errors import InvalidRequestError

_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Names reasoning arrives under; templates read `reasoning_content` (gpt-oss reads `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` (already checked by `validate_messages`) into the prompt text.

    Args:
        template: the Jinja source, e.g. `Tokenizer.chat_template`.
        messages: OpenAI-style messages; keys whose value is None are dropped, as transformers does.
        tools: JSON schemas of the tools the model may call, passed to the template as `tools`.
        documents: retrieval documents, for templates that take them.
        add_generation_prompt: end with the header that opens the assistant's turn.
        enable_thinking: passed only when set: templates testing `is defined` keep their default.
        bos_token, eos_token: the model's special tokens as text, passed when the model has them.
        **kwargs: any other template variable (e.g. `reasoning_effort`).

    Raises:
        InvalidRequestError: the template does not compile, or fails on these messages (including
            its own `raise_exception`, such as a model that refuses a system message).
    """
    optional = {"bos_token": bos_token, "eos_token": eos_token, "enable_thinking": enable_thinking}
    variables = {name: value for name, value in optional.items() if value is not None}
    chat = [
        _with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages
    ]
    try:
        return _compile(template).render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"chat template failed: {e}", param="messages") from e
    except (TypeError, ValueError) as e:  # template code doing e.g. `str + int` on these messages
        raise InvalidRequestError(
            f"chat template failed on these messages: {e!r}", param="messages"
        ) from e


@dataclass(frozen=True, slots=True)
class TemplateCapabilities:
    """What a chat template writes into the prompt when it is given it."""

    renders_tools: bool  # the `tools` variable (function definitions)
    renders_tool_calls: bool  # an assistant message's `tool_calls`
    renders_tool_results: bool  # a `role: "tool"` message's content


_PROBE = "ladle_probe_7f3a"  # a name no template or message contains by chance


@lru_cache(maxsize=64)
def template_capabilities(template: str) -> TemplateCapabilities:
    """Find out by rendering, as minja's capability probe does, what `template` does with tools.

    Reading the template's text for `tools` is not enough: many templates mention a variable
    they never print, and some print any role's content (tool results included) without
    knowing tools at all. A template that fails on a probe counts as not rendering it.
    """
    tool = {"type": "function", "function": {"name": _PROBE + "_tool", "parameters": {}}}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": _PROBE + "_call", "arguments": {}},
    }
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": _PROBE + "_result", "tool_call_id": "call_1"},
    ]
    with_tools = _probe(template, [{"role": "user", "content": "Hi"}], [tool])
    with_calls = _probe(template, conversation, None)
    return TemplateCapabilities(
        renders_tools=_PROBE + "_tool" in with_tools,
        renders_tool_calls=_PROBE + "_call" in with_calls,
        renders_tool_results=_PROBE + "_result" in with_calls,
    )


def _probe(template: str, messages: list[dict[str, Any]], tools: Any) -> str:
    try:
        return render_chat_template(template, messages, tools=tools, add_generation_prompt=False)
    except InvalidRequestError:  # the template refuses this shape: it does not render it
        return ""


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies a text-only template can render.

    Roles must be system, user, assistant or tool (`developer`, OpenAI's newer name for system,
    becomes system). Content is a string, None (an assistant turn that only calls tools) or a
    list of text parts, which is joined with newlines. Tool-call arguments sent as a JSON string
    are parsed into an object, since templates write them with `tojson`.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("must be a non-empty list of messages", param="messages")
    return [_validate_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _validate_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidRequestError("must be an object with a role", param=where)
    role = message.get("role")
    role = "system" if role == "developer" else role
    if role not in _ROLES:
        raise InvalidRequestError(
            f"unknown role {role!r} (expected system, user, assistant or tool)",
            param=f"{where}.role",
        )
    checked = {
        **message,
        "role": role,
        "content": _text_content(message.get("content"), f"{where}.content"),
    }
    if message.get("tool_calls") is not None:
        checked["tool_calls"] = _parsed_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    return checked


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(
                f"unsupported content part {kind!r}: this model reads text parts only",
                param=f"{where}[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _parsed_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise InvalidRequestError("must be a list", param=where)
    parsed = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError("must have a function with a name", param=f"{where}[{j}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise InvalidRequestError(
                    f"arguments are not valid JSON ({e})", param=f"{where}[{j}].function.arguments"
                ) from e
        parsed.append({**call, "function": {**function, "arguments": arguments}})
    return parsed


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
    rendering only needs its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(message, param="messages")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # unlike Jinja's own filter: no HTML escaping, and json.dumps' options
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequestError(f"chat template does not compile: {e} (line {e.lineno})") from e
