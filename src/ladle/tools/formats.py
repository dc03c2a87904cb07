"""Tool-call syntax per model family, and which tools a request lets a reply call.

A model calls tools in the syntax its chat template taught it, so the syntax is read from the
template: Hermes/Qwen `<tool_call>{json}</tool_call>`, Llama 3 `{"name", "parameters"}` (after
`<|python_tag|>`), Mistral `[TOOL_CALLS][{...}]`, or, for a template that knows no tools, a
bare JSON object `{"name", "arguments"}` that ladle itself describes in the system prompt
(`template_messages`, the polyfill minja applies for llama.cpp).
The streaming parser (parser.py) reads replies back in this syntax, and the forced-call
grammar (grammar.py) makes a model write it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ladle.engine.loading.chat_template import TemplateCapabilities
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.protocol.openai import ChatCompletionRequest, NamedToolChoice, Tool


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model family writes its calls."""

    name: str
    start: str | None  # marker before a call (or before the list of calls)
    end: str | None  # marker after one call; None: the calls run to the end of the reply
    arguments_key: Literal["arguments", "parameters"]
    parallel: bool  # the syntax (and the template) carries several calls in one reply
    start_token_id: int | None = None  # `start` as one special token of this model's vocabulary


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", parallel=True)
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", None, "parameters", parallel=False)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, "arguments", parallel=True)
JSON_CALLS = ToolFormat("json", None, None, "arguments", parallel=True)


def detect_format(template: str | None) -> ToolFormat:
    """The call syntax `template` teaches; JSON calls when it teaches none."""
    if not template:
        return JSON_CALLS
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or (
        "<|start_header_id|>" in template and '"parameters"' in template
    ):
        return LLAMA3
    return JSON_CALLS


def model_tool_format(tokenizer: Tokenizer) -> ToolFormat:
    """The call syntax of the model `tokenizer` belongs to, with its marker token if any."""
    fmt = detect_format(tokenizer.chat_template)
    token_id = tokenizer.token_to_id(fmt.start) if fmt.start else None
    if token_id is not None and tokenizer.is_special(token_id):
        return replace(fmt, start_token_id=token_id)
    return fmt


def format_calls(fmt: ToolFormat, calls: Iterable[tuple[str, Any]]) -> str:
    """`(name, arguments)` pairs written as the model writes them."""
    objects = [
        json.dumps({"name": name, fmt.arguments_key: arguments}, ensure_ascii=False)
        for name, arguments in calls
    ]
    if fmt.name == HERMES.name:
        return "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objects)
    if fmt.name == MISTRAL.name:
        return f"[TOOL_CALLS][{', '.join(objects)}]"
    return "\n".join(objects)


# ---------------------------------------------------------------- what a request asks for


def allows_several_calls(req: ChatCompletionRequest, fmt: ToolFormat) -> bool:
    """`parallel_tool_calls`, unless the syntax carries one call or `tool_choice` names a
    function: that is a call to it, one (as vLLM constrains it), which a small model would
    otherwise repeat until max_tokens."""
    named = isinstance(req.effective_tool_choice(), NamedToolChoice)
    return req.parallel_tool_calls and fmt.parallel and not named


def callable_tools(req: ChatCompletionRequest) -> list[Tool]:
    """The tools a reply may call: all of them, only the named one, or none."""
    choice = req.effective_tool_choice()
    if choice == "none" or not req.tools:
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in req.tools if t.function.name == choice.function.name]
    return list(req.tools)


def is_call_forced(req: ChatCompletionRequest) -> bool:
    """`required` or a named function: the reply must be a call, so it is constrained."""
    choice = req.effective_tool_choice()
    return choice == "required" or isinstance(choice, NamedToolChoice)


# ---------------------------------------------------------------- templates without tools


def template_messages(
    capabilities: TemplateCapabilities,
    fmt: ToolFormat,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """`messages` rewritten so a template that cannot render tools still shows them.

    Each missing piece is filled in as minja's polyfills do for llama.cpp: the tool list and
    how to call goes into the system message; an assistant's `tool_calls` become its text in
    `fmt`'s syntax; a tool result becomes a user message `{"tool_response": ...}`. `messages`
    are checked ones (`validate_messages`: arguments already parsed into objects).
    """
    out = []
    call_names: dict[str, str] = {}
    for message in messages:
        calls = message.get("tool_calls")
        for call in calls or []:
            call_names[str(call.get("id"))] = call["function"]["name"]
        if calls and not capabilities.renders_tool_calls:
            text = format_calls(fmt, ((c["function"]["name"], _arguments(c)) for c in calls))
            content = message.get("content")
            message = {
                "role": "assistant",
                "content": f"{content}\n{text}" if content else text,
            }
        elif message["role"] == "tool" and not capabilities.renders_tool_results:
            response = {
                "name": call_names.get(str(message.get("tool_call_id")), ""),
                "content": message.get("content") or "",
            }
            message = {"role": "user", "content": json.dumps({"tool_response": response})}
        out.append(message)
    if tools and not capabilities.renders_tools:
        out = _with_system_text(out, _tools_prompt(fmt, tools))
    return out


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments")
    return {} if arguments is None else arguments


def _tools_prompt(fmt: ToolFormat, tools: list[dict[str, Any]]) -> str:
    functions = (t.get("function", t) for t in tools)  # `tokenize(tools=...)` takes them as given
    listed = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    example = format_calls(fmt, [("<tool name>", {"<argument>": "<value>"})])
    return (
        f"You can call these tools:\n{listed}\n"
        f"To call a tool, reply with only: {example}\n"
        "The arguments must follow the tool's parameters. A tool's result comes back as "
        'a "tool_response".'
    )


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = messages[0].get("content") or ""
        system = {**messages[0], "content": f"{first}\n\n{text}" if first else text}
        return [system, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
