"""Replies read back as OpenAI `tool_calls`, as they stream.

Every format (formats.py) also accepts a reply that is only JSON calls: the engine's decoder
drops special tokens, so a `[TOOL_CALLS]` or `<|python_tag|>` that is one never reaches the
parser. A call counts only if it names an offered tool and its arguments are a JSON object;
anything else stays text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from ladle.protocol.openai import ChatCompletionRequest
from ladle.tools.formats import ToolFormat, allows_several_calls, callable_tools


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
