"""Structured output at the API's edge: which constraint a request asks for, and the reply read
back as a Python value.

A request names its constraint in one of three ways: OpenAI's `response_format` (chat only),
mistral.rs's `grammar`, or a forced tool call (`tool_choice` `required` or a named function,
whose grammar tools/grammar.py builds). Each is compiled for the model by the engine's
`GrammarCompiler`; errors name the field the user wrote.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel

from ladle.engine.grammar import CompiledGrammar, GrammarCompiler
from ladle.errors import InvalidRequestError, StructuredOutputError
from ladle.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    Constraint,
)
from ladle.tools.formats import ToolFormat, allows_several_calls, callable_tools, is_call_forced
from ladle.tools.grammar import tool_call_grammar

M = TypeVar("M", bound=BaseModel)


def request_grammar(
    compiler: GrammarCompiler,
    req: ChatCompletionRequest | CompletionRequest,
    tool_format: ToolFormat,
) -> CompiledGrammar | None:
    """The compiled constraint of `req`, or None when its output is free.

    Every tool's parameters are compiled too, forced or not, so a schema llguidance cannot
    follow is refused up front, naming the tool, rather than on the turn that forces it.
    """
    if isinstance(req, ChatCompletionRequest):
        for i, tool in enumerate(req.tools or []):
            param = f"tools[{i}].function.parameters"
            compiler.compile("json_schema", tool.function.parameters_schema(), param)
        if is_call_forced(req):
            return _tool_call_grammar(compiler, req, tool_format)
    found = _constraint(req)
    if found is None:
        return None
    constraint, param = found
    return compiler.compile(constraint.type, constraint.value, param)


def _tool_call_grammar(
    compiler: GrammarCompiler, req: ChatCompletionRequest, tool_format: ToolFormat
) -> CompiledGrammar:
    if _constraint(req) is not None:
        raise InvalidRequestError(
            "a forced tool call (tool_choice 'required' or a named function) is already a "
            "constraint; drop response_format or grammar",
            param="tool_choice",
        )
    several = allows_several_calls(req, tool_format)
    grammar = tool_call_grammar(tool_format, callable_tools(req), several)
    return compiler.compile("lark", grammar, "tools")


def _constraint(req: ChatCompletionRequest | CompletionRequest) -> tuple[Constraint, str] | None:
    fmt = req.response_format if isinstance(req, ChatCompletionRequest) else None
    if fmt is not None and fmt.type != "text":
        if req.grammar is not None:
            raise InvalidRequestError(
                "set either response_format or grammar, not both", param="grammar"
            )
        if fmt.json_schema is None:
            return Constraint.json_object(), "response_format"
        return Constraint.json_schema(fmt.json_schema.schema_), "response_format.json_schema.schema"
    if req.grammar is None:
        return None
    return req.grammar, "grammar"


def structured_request(
    req: ChatCompletionRequest, schema: type[BaseModel] | dict[str, Any]
) -> ChatCompletionRequest:
    """`req` constrained to JSON following `schema` (a pydantic model or a JSON schema)."""
    return req.model_copy(
        update={"grammar": Constraint.json_schema(schema), "response_format": None}
    )


def parse_structured(schema: type[M] | dict[str, Any], response: ChatCompletionResponse) -> Any:
    """The first choice as an instance of `schema`, or the JSON value for a schema dict.

    A reply cut off by `max_tokens` is incomplete, so it raises instead of being parsed.
    """
    choice = response.choices[0]
    text = choice.message.content or ""
    if choice.finish_reason != "stop":
        raise StructuredOutputError(
            f"generation stopped ({choice.finish_reason}) before the JSON was complete; "
            f"raise max_tokens (got {response.usage.completion_tokens} tokens: {text[:80]!r})"
        )
    try:
        if isinstance(schema, dict):
            return json.loads(text)
        return schema.model_validate_json(text)
    except ValueError as e:  # pydantic's ValidationError too: checks llguidance cannot enforce
        raise StructuredOutputError(f"the reply does not follow the schema: {e}") from e
