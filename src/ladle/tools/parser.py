"""Tool calling: the syntax a model family calls tools in, its replies read back as OpenAI
`tool_calls`, and the grammar that forces a well-formed call.

A model calls tools in the syntax its chat template taught it, so the syntax is read from the
template: Hermes/Qwen `<tool_call>{json}</tool_call>`, Llama 3 `{"name", "parameters"}` (after
`<|python_tag|>`), Mistral `[TOOL_CALLS][{...}]`, or, for a template that knows no tools, a
bare JSON object `{"name", "arguments"}` that ladle itself describes in the system prompt
(`template_messages`, the polyfill minja applies for llama.cpp). Every format also accepts a
reply that is only JSON calls: the engine's decoder drops special tokens, so a
`[TOOL_CALLS]` or `<|python_tag|>` that is one never reaches the parser.

A call counts only if it names an offered tool and its arguments are a JSON object; anything
else stays text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ladle.engine.loading.chat_template import TemplateCapabilities
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.protocol.openai import ChatCompletionRequest, NamedToolChoice, Tool, closed_schema


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


@dataclass(frozen=True, slots=True)
class ToolParsing:
    """How to read one request's replies: which tools count and how many calls."""

    format: ToolFormat
    names: frozenset[str]
    parallel: bool

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.format, self.names, self.parallel)


def tool_parsing(req: ChatCompletionRequest, fmt: ToolFormat) -> ToolParsing | None:
    """None when replies are plain text: no tools, or `tool_choice` `none`."""
    tools = callable_tools(req)
    if not tools:
        return None
    names = frozenset(t.function.name for t in tools)
    return ToolParsing(fmt, names, allows_several_calls(req, fmt))


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


# ---------------------------------------------------------------- the forced call's grammar


def tool_call_grammar(fmt: ToolFormat, tools: list[Tool], parallel: bool) -> str:
    """A Lark grammar (llguidance) for a reply that is one call, or one or more when
    `parallel`, to `tools`, in `fmt`'s syntax, arguments following each tool's parameters.

    Objects that list their properties are closed to others (`additionalProperties: false`
    unless set): left open, a small model adds keys without end, and a caller expects the
    arguments its function declares. When `fmt.start` is one special token (Mistral's
    `[TOOL_CALLS]`), the grammar asks for that token, as the model was trained to write it.
    """
    definitions: dict[str, Any] = {}
    variants = []
    for i, tool in enumerate(tools):
        definitions.update(_hoisted(closed_schema(tool.function.parameters_schema()), f"tool{i}"))
        properties = {"name": {"const": tool.function.name}, fmt.arguments_key: _ref(f"tool{i}")}
        variants.append(
            {
                "type": "object",
                "properties": properties,
                "required": ["name", fmt.arguments_key],
                "additionalProperties": False,
            }
        )
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # compact JSON: a small model left free to indent can loop on whitespace
    schema = {**schema, "$defs": definitions, "x-guidance": {"whitespace_flexible": False}}
    several = parallel and fmt.parallel  # one call for a syntax that carries one
    if fmt.name == HERMES.name:
        start = 'start: call ("\\n" call)*' if several else "start: call"
        call = 'call: "<tool_call>\\n" json_call "\\n</tool_call>"'
    elif fmt.name == MISTRAL.name:
        token_id = fmt.start_token_id
        marker = f"<[{token_id}]>" if token_id is not None else '"[TOOL_CALLS]"'
        start = f'start: {marker} "[" json_call ' + ('("," json_call)* "]"' if several else '"]"')
        call = ""
    else:
        start = 'start: json_call ("\\n" json_call)*' if several else "start: json_call"
        call = ""
    rules = (start, call, f"json_call: %json {json.dumps(schema)}")
    return "\n".join(rule for rule in rules if rule)


def _hoisted(parameters: dict[str, Any], name: str) -> dict[str, Any]:
    """`parameters` and its own definitions as entries of the call schema's `$defs`.

    Inside the call schema, a tool's `#/$defs/...` references (pydantic writes them for
    nested models) and `#` (a recursive schema) would point at the call schema's root, so
    each tool's definitions move there under its own prefix and its references follow.
    """
    own = {**parameters.get("$defs", {}), **parameters.get("definitions", {})}
    body = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
    hoisted = {f"{name}_{key}": _retargeted(value, name) for key, value in own.items()}
    return {name: _retargeted(body, name), **hoisted}


def _retargeted(schema: Any, name: str) -> Any:
    if isinstance(schema, list):
        return [_retargeted(s, name) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _retargeted(v, name) for k, v in schema.items()}
    ref = out.get("$ref")
    if ref == "#":
        out["$ref"] = _ref(name)["$ref"]
    elif isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = _ref(f"{name}_{ref.split('/', 2)[2]}")["$ref"]
    return out


def _ref(definition: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{definition}"}


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


# ---------------------------------------------------------------- reading replies


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # the arguments object as JSON text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


Piece = str | ParsedCall  # text to show, or a call


class ToolCallParser:
    """Splits one reply, fed as it is generated, into text and calls.

    Text streams out at once, except what might be the start of a call: a tail that could
    begin `fmt.start`, a reply that opens with `{` or `[` (a JSON call, read when the reply
    ends), and whitespace that would sit between text and a call (dropped around calls).
    A call that does not parse comes out as the text it was. `feed(...)` then `finish()`
    over a whole reply gives what streaming gives, in one piece or many.
    """

    def __init__(self, fmt: ToolFormat, names: frozenset[str], parallel: bool) -> None:
        self.format = fmt
        self.names = names
        self.parallel = parallel  # False: calls after the first are dropped
        self._buffer = ""  # text read but not yet given out
        self._mode: Literal["start", "text", "call", "json"] = "start"
        self._gap = ""  # whitespace before a call marker, given back if the call does not parse
        self._num_calls = 0
        self._after_call = False
        self._out: list[Piece] = []

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        return self._scan(final=False)

    def finish(self) -> list[Piece]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[Piece]:
        self._out = []
        while self._step(final):
            pass
        return self._out

    def _step(self, final: bool) -> bool:
        """Advance one state; True while there may be more to do now."""
        if self._mode == "start":
            stripped = self._buffer.lstrip()
            if not stripped:
                if final and not self._after_call:
                    self._text(self._buffer)
                    self._buffer = ""
                return False
            if self._after_call:  # whitespace between a call and what follows is dropped
                self._buffer, self._after_call = stripped, False
            self._mode = "json" if stripped[0] in "{[" else "text"
            return True
        if self._mode == "json":
            if final:
                self._calls_or_text(self._buffer, self._buffer, tail_is_text=True)
                self._buffer = ""
            return False
        if self._mode == "text":
            return self._step_text(final)
        return self._step_call(final)

    def _step_text(self, final: bool) -> bool:
        start = self.format.start
        at = self._buffer.find(start) if start else -1
        if start and at >= 0:
            before = self._buffer[:at]
            content = before.rstrip()
            self._text(content)
            self._gap = before[len(content) :]
            self._buffer = self._buffer[at + len(start) :]
            self._mode = "call"
            return True
        if final:
            self._text(self._buffer)
            self._buffer = ""
            return False
        keep = _marker_prefix_len(self._buffer, start) if start else 0
        cut = len(self._buffer) - keep
        if start:  # whitespace just before a possible marker may belong around a call
            cut = len(self._buffer[:cut].rstrip())
        self._text(self._buffer[:cut])
        self._buffer = self._buffer[cut:]
        return False

    def _step_call(self, final: bool) -> bool:
        start, end = self.format.start or "", self.format.end
        at = self._buffer.find(end) if end else -1
        if at < 0 and not final:
            return False
        body = self._buffer[:at] if at >= 0 else self._buffer
        raw = self._gap + start + (self._buffer[: at + len(end)] if end and at >= 0 else body)
        self._buffer = self._buffer[at + len(end) :] if end and at >= 0 else ""
        self._gap = ""
        self._calls_or_text(body, raw, tail_is_text=not end)
        self._mode = "start"
        return True

    def _calls_or_text(self, body: str, raw: str, tail_is_text: bool = False) -> None:
        """Give out the calls `body` holds, or `raw` as text if it holds none. With
        `tail_is_text` (calls that run to the end of the reply), what follows the last whole
        call is text: a reply cut short by max_tokens keeps the calls it finished."""
        values, end = _json_values(body)
        calls = self._read_calls(values)
        if calls is None or not (tail_is_text or end == len(body)):
            self._text(raw)
            return
        for call in calls:
            if self.parallel or self._num_calls == 0:  # parallel_tool_calls false: the first
                self._out.append(call)
            self._num_calls += 1
        self._text(body[end:].lstrip())
        self._after_call = True

    def _text(self, text: str) -> None:
        if text:
            self._out.append(text)

    def _read_calls(self, values: list[Any]) -> list[ParsedCall] | None:
        calls = []
        for value in values:
            for item in value if isinstance(value, list) else [value]:
                call = self._read_call(item)
                if call is None:
                    return None
                calls.append(call)
        return calls or None

    def _read_call(self, item: Any) -> ParsedCall | None:
        if not isinstance(item, dict) or item.get("name") not in self.names:
            return None
        key = next((k for k in ("arguments", "parameters") if k in item), None)
        if key is None:  # a name alone is too likely an ordinary JSON answer
            return None
        arguments = item[key]
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def parse_reply(parsing: ToolParsing, text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole reply's text (None when it only calls) and its calls."""
    parser = parsing.parser()
    pieces = parser.feed(text) + parser.finish()
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    content = "".join(p for p in pieces if isinstance(p, str))
    return (content or None) if calls else content, calls


def _json_values(text: str) -> tuple[list[Any], int]:
    """The JSON values at the start of `text`, one after another (whitespace or `;` between
    them, as Llama 3.2 writes several calls), and where the first thing that is not one starts
    (`len(text)` when all is)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        start = at
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values, at
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return values, start
        values.append(value)


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that `marker` starts with."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
