"""The grammar of a forced tool call: `tool_choice` `required` or a named function.

The reply must be a call in the model's own syntax (formats.py), to an offered tool, with
arguments that follow that tool's parameters; llguidance enforces the grammar token by token.
"""

from __future__ import annotations

import json
from typing import Any

from ladle.protocol.openai import Tool, closed_schema
from ladle.tools.formats import HERMES, MISTRAL, ToolFormat


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
    # compact JSON: a small model left free to indent can loop on whitespace; lenient: keywords
    # llguidance cannot enforce are checked after generation (cores/structured.py)
    guidance = {"whitespace_flexible": False, "lenient": True}
    schema = {**schema, "$defs": definitions, "x-guidance": guidance}
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
