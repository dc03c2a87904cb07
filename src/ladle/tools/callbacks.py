"""Tools that run in ladle's process: what a tool is, what it returns, and Python callbacks.

A `ServerTool` is offered to the model beside the request's own tools and run by the agent
loop (runtime.py) when the model calls it; Python callbacks (`with_tool_callback`, `@tool`)
and MCP servers' tools (mcp.py) both become one. Whatever a tool returns is a `ToolOutput`:
text for the model, and files (bytes with a name and a media type) kept in the file store.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError, create_model

from ladle.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class ToolFile:
    """A file a tool produced: kept in the file store, shown to the model as a short note."""

    name: str
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """What one tool call gave back. `is_error` marks a failure reported to the model as the
    tool's result (an exception, a timeout, a dead server): the loop goes on."""

    text: str
    files: tuple[ToolFile, ...] = ()
    is_error: bool = False


ToolRun = Callable[[dict[str, Any]], Awaitable[ToolOutput]]


@dataclass(frozen=True, slots=True)
class ServerTool:
    """A tool ladle runs itself. `run` takes the call's arguments (a JSON object) and is
    awaited on the tool runner's event loop; `source` says where it comes from ("callback",
    or "mcp:<server>") for progress events and errors."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: ToolRun = field(repr=False)
    source: str = "callback"

    def definition(self) -> dict[str, Any]:
        """The OpenAI `tools` entry the model is shown."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def to_output(value: Any) -> ToolOutput:
    """A callback's return value as a `ToolOutput`: text as it is, a `ToolFile` (or a list of
    text and files), a pydantic model or any JSON value as JSON text."""
    if isinstance(value, ToolOutput):
        return value
    if isinstance(value, ToolFile):
        return ToolOutput("", (value,))
    if isinstance(value, str):
        return ToolOutput(value)
    if isinstance(value, BaseModel):
        return ToolOutput(value.model_dump_json())
    if isinstance(value, list) and any(isinstance(v, ToolFile) for v in value):
        files = tuple(v for v in value if isinstance(v, ToolFile))
        texts = [v if isinstance(v, str) else json.dumps(v) for v in value if v not in files]
        return ToolOutput("\n".join(texts), files)
    if value is None:
        return ToolOutput("")
    return ToolOutput(json.dumps(value, default=str))


def tool_callback(
    name: str,
    fn: Callable[..., Any],
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> ServerTool:
    """A Python function as a tool. Without `parameters`, its JSON schema comes from the
    function's signature (type hints and defaults, through pydantic), and the model's
    arguments are validated and converted against it before the call; with them, the
    arguments are passed as they are, as keywords.

    The function may be sync (run on a worker thread, so it can block) or async.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InvalidRequestError(
            f"tool name {name!r} must be letters, digits, '_' or '-'", param="name"
        )
    if not callable(fn):
        raise InvalidRequestError(f"tool {name!r}: {fn!r} is not callable", param="fn")
    arguments_model = None if parameters is not None else _arguments_model(name, fn)
    schema = parameters if parameters is not None else _schema(arguments_model)
    text = description if description is not None else inspect.getdoc(fn) or ""

    async def run(arguments: dict[str, Any]) -> ToolOutput:
        kwargs = arguments
        if arguments_model is not None:
            try:
                parsed = arguments_model.model_validate(arguments)
            except ValidationError as e:
                return ToolOutput(f"invalid arguments for {name}: {_first_error(e)}", (), True)
            kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        if inspect.iscoroutinefunction(fn):
            value = await fn(**kwargs)
        else:
            value = await asyncio.to_thread(fn, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        return to_output(value)

    return ServerTool(name, text, schema, run)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Any:
    """Decorator form of `tool_callback`: `@tool` or `@tool(name=..., description=...)` over a
    function turns it into a `ServerTool` that `with_tool_callback(tool)` takes whole. The
    schema comes from the type hints, the description from the docstring."""

    def wrap(f: Callable[..., Any]) -> ServerTool:
        return tool_callback(name or f.__name__, f, description)

    return wrap(fn) if fn is not None else wrap


def _arguments_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    hints = get_type_hints(fn)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    return create_model(f"{name}_arguments", **fields)


def _schema(model: type[BaseModel] | None) -> dict[str, Any]:
    assert model is not None
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


def _first_error(e: ValidationError) -> str:
    error = e.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "arguments"
    return f"{where}: {error['msg']}"
