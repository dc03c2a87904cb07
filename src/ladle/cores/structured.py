"""Structured output at the API's edge: which constraint a request asks for, and the reply read
back as a Python value.

A request names its constraint in one of three ways: OpenAI's `response_format` (chat only),
mistral.rs's `grammar`, or a forced tool call (`tool_choice` `required` or a named function,
whose grammar tools/grammar.py builds). Each is compiled for the model by the engine's
`GrammarCompiler`; errors name the field the user wrote.

A JSON schema (`response_format`, `grammar`, a tool's `parameters`) with keywords the grammar
cannot enforce is refused under OpenAI's `strict`, and otherwise served: the complete reply is
then checked with `jsonschema` (`ReplyCheck`), and a violation is reported on the choice
(`schema_violation`), where an OpenAI client still parses the response, rather than hidden.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from ladle.engine.grammar import CompiledGrammar, GrammarCompiler
from ladle.errors import InvalidRequestError, StructuredOutputError
from ladle.protocol.openai import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    Constraint,
    Tool,
)
from ladle.tools.formats import ToolFormat, allows_several_calls, callable_tools, is_call_forced
from ladle.tools.grammar import tool_call_grammar

M = TypeVar("M", bound=BaseModel)

logger = logging.getLogger(__name__)


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
        tools = _compiled_tools(compiler, req)
        if is_call_forced(req):
            return _tool_call_grammar(compiler, req, tool_format, tools)
    found = _constraint(req)
    if found is None:
        return None
    constraint, param, strict = found
    return compiler.compile(constraint.type, constraint.value, param, strict=strict)


def _compiled_tools(
    compiler: GrammarCompiler, req: ChatCompletionRequest
) -> dict[str, CompiledGrammar]:
    return {
        tool.function.name: compiler.compile(
            "json_schema",
            tool.function.parameters_schema(),
            f"tools[{i}].function.parameters",
            strict=bool(tool.function.strict),
        )
        for i, tool in enumerate(req.tools or [])
    }


def _tool_call_grammar(
    compiler: GrammarCompiler,
    req: ChatCompletionRequest,
    tool_format: ToolFormat,
    compiled: dict[str, CompiledGrammar],
) -> CompiledGrammar:
    if _constraint(req) is not None:
        raise InvalidRequestError(
            "a forced tool call (tool_choice 'required' or a named function) is already a "
            "constraint; drop response_format or grammar",
            param="tool_choice",
        )
    several = allows_several_calls(req, tool_format)
    tools = [_enforceable(t, compiled[t.function.name]) for t in callable_tools(req)]
    return compiler.compile("lark", tool_call_grammar(tool_format, tools, several), "tools")


def _enforceable(tool: Tool, compiled: CompiledGrammar) -> Tool:
    """`tool` with the parameters its grammar can follow: the coarser schema llguidance fell
    back to when it could not compile the given one (the arguments are checked after)."""
    if compiled.fallback is None:
        return tool
    function = tool.function.model_copy(update={"parameters": {"type": "object"}})
    return tool.model_copy(update={"function": function})


def _constraint(
    req: ChatCompletionRequest | CompletionRequest,
) -> tuple[Constraint, str, bool] | None:
    """The constraint of `req` besides tools, the field it came from, and whether `strict`."""
    fmt = req.response_format if isinstance(req, ChatCompletionRequest) else None
    if fmt is not None and fmt.type != "text":
        if req.grammar is not None:
            raise InvalidRequestError(
                "set either response_format or grammar, not both", param="grammar"
            )
        if fmt.json_schema is None:
            return Constraint.json_object(), "response_format", False
        schema = Constraint.json_schema(fmt.json_schema.schema_)
        return schema, "response_format.json_schema.schema", bool(fmt.json_schema.strict)
    if req.grammar is None:
        return None
    return req.grammar, "grammar", False


@dataclass(frozen=True, slots=True)
class ReplyCheck:
    """The JSON schemas a reply must follow whose grammar left parts of them unenforced:
    `content`'s for the reply's text, `tools`' (by name) for each call's arguments. Checked
    with `jsonschema` once the reply is complete."""

    content: Any = None
    tools: dict[str, Any] = field(default_factory=dict)

    def violation(self, message: AssistantMessage) -> str | None:
        """How `message` breaks its schema (with the JSON path), or None when it follows it
        (or nothing here applies to it); a violation is logged as a warning too."""
        problem = None
        if message.tool_calls:
            for i, call in enumerate(message.tool_calls):
                schema = self.tools.get(call.function.name)
                found = None if schema is None else _violation(schema, call.function.arguments)
                if found is not None:
                    problem = f"tool_calls[{i}].function.arguments: {found}"
                    break
        elif self.content is not None:
            problem = _violation(self.content, message.content or "")
        if problem is not None:
            logger.warning("a reply does not follow its JSON schema: %s", problem)
        return problem


def reply_check(compiler: GrammarCompiler, req: ChatCompletionRequest) -> ReplyCheck | None:
    """What of `req`'s schemas its reply is checked against after generation: those the
    grammar does not wholly enforce (None when there are none). `request_grammar` compiled
    them already: the compiler answers from its cache."""
    tools = {
        tool.function.name: tool.function.parameters_schema()
        for tool in req.tools or []
        if compiler.compile("json_schema", tool.function.parameters_schema(), "tools").unenforced
    }
    found = _constraint(req)
    content = None
    if found is not None and found[0].type == "json_schema":
        constraint, param, _ = found
        if compiler.compile(constraint.type, constraint.value, param).unenforced:
            value = constraint.value
            content = json.loads(value) if isinstance(value, str) else value
    return ReplyCheck(content, tools) if content is not None or tools else None


def _violation(schema: Any, text: str) -> str | None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for
    from referencing.exceptions import Unresolvable

    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        error = best_match(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value))
    except (Unresolvable, re.error) as e:  # a remote $ref; a pattern Python's re rejects
        return f"not checked: the schema cannot be applied ({e})"
    return None if error is None else f"{error.message} at {error.json_path}"


def structured_request(
    req: ChatCompletionRequest, schema: type[BaseModel] | dict[str, Any]
) -> ChatCompletionRequest:
    """`req` constrained to JSON following `schema` (a pydantic model or a JSON schema)."""
    return req.model_copy(
        update={"grammar": Constraint.json_schema(schema), "response_format": None}
    )


def parse_structured(schema: type[M] | dict[str, Any], response: ChatCompletionResponse) -> Any:
    """The first choice as an instance of `schema`, or the JSON value for a schema dict.

    A reply cut off by `max_tokens` is incomplete, and one that breaks a part of the schema
    the grammar could not enforce is invalid: either raises instead of being parsed.
    """
    choice = response.choices[0]
    text = choice.message.content or ""
    if choice.finish_reason != "stop":
        raise StructuredOutputError(
            f"generation stopped ({choice.finish_reason}) before the JSON was complete; "
            f"raise max_tokens (got {response.usage.completion_tokens} tokens: {text[:80]!r})"
        )
    if choice.schema_violation is not None:
        raise StructuredOutputError(
            f"the reply does not follow the schema: {choice.schema_violation}"
        )
    try:
        if isinstance(schema, dict):
            return json.loads(text)
        return schema.model_validate_json(text)
    except ValueError as e:  # pydantic's ValidationError too: checks llguidance cannot enforce
        raise StructuredOutputError(f"the reply does not follow the schema: {e}") from e
