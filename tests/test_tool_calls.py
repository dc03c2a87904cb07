"""Tool calling: formats read from chat templates, replies parsed into OpenAI `tool_calls`
(whole and streamed), the forced-call grammar, templates without tools, bad tool requests, and
forced calls on the real SmolLM2 whose arguments always validate."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher
from pydantic import BaseModel

from ladle import GgufModelBuilder, InvalidRequestError, Model, RequestBuilder
from ladle.cores.responses import Accumulator
from ladle.cores.text import CONSTRAINED_MAX_TOKENS
from ladle.engine.grammar import GrammarCompiler
from ladle.engine.loading.chat_template import render_chat_template, template_capabilities
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.sequence import TokenEvent
from ladle.protocol.openai import ChatCompletionChunk, ChatCompletionRequest, Tool, parse_request
from ladle.tools.formats import (
    HERMES,
    JSON_CALLS,
    LLAMA3,
    MISTRAL,
    ToolFormat,
    detect_format,
    format_calls,
    template_messages,
)
from ladle.tools.grammar import tool_call_grammar
from ladle.tools.parser import ParsedCall, ToolParsing, parse_reply

# the tool-related lines of each family's template, as their models ship them
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    '{{- tool | tojson }}{%- endfor %}{{- \'</tools>\\nReturn <tool_call>{"name": <name>, '
    '"arguments": <args>}</tool_call><|im_end|>\\n\' }}{%- endif %}'
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response>"
    "<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    '{%- for call in message.tool_calls or [] %}{{- \'<tool_call>\\n{"name": "\' + '
    'call.function.name + \'", "arguments": \' + call.function.arguments | tojson + '
    "'}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA_TEMPLATE = (
    "{{- '<|start_header_id|>system<|end_header_id|>' }}{%- if tools %}Respond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.'
    "{%- endif %}{{- '<|eot_id|>' }}"
)
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["a", "b"],
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["id"],
        },
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "urgent": {"type": "boolean"},
    },
    "required": ["user", "urgent"],
}


def _tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"the {name} function"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [_tool("get_weather", WEATHER), _tool("add", ADD)]
NAMES = frozenset({"get_weather", "add"})


# ---- formats


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN_TEMPLATE, HERMES),
        (LLAMA_TEMPLATE, LLAMA3),
        (MISTRAL_TEMPLATE, MISTRAL),
        (SMOL_TEMPLATE, JSON_CALLS),
        (None, JSON_CALLS),
    ],
)
def test_format_is_read_from_the_template(template: str | None, expected: ToolFormat) -> None:
    assert detect_format(template) == expected


# ---- parsing whole replies


def _parse(fmt: ToolFormat, text: str, parallel: bool = True) -> tuple[str | None, list[Any]]:
    content, calls = parse_reply(ToolParsing(fmt, NAMES, parallel), text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_calls_with_text_around_them() -> None:
    text = (
        "Checking both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>\nDone.'
    )
    content, calls = _parse(HERMES, text)
    assert calls == [("get_weather", {"city": "Oslo", "unit": "c"}), ("add", {"a": 1, "b": 2})]
    assert content == "Checking both.Done."


def test_malformed_or_unknown_calls_stay_content() -> None:
    for text in (
        'Hi <tool_call>{"name": "add", "arguments": {"a": 1,</tool_call> bye',
        '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
        "x < y and <tool_",
        '{"name": "add"} is not a call: the reply goes on',
    ):
        assert _parse(HERMES, text) == (text, [])


def test_only_json_replies_are_calls_in_the_generic_format() -> None:
    call = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert _parse(JSON_CALLS, f"  {call}\n{call}") == (None, [("add", {"a": 1, "b": 2})] * 2)
    assert _parse(JSON_CALLS, f"Sure: {call}") == (f"Sure: {call}", [])
    assert _parse(JSON_CALLS, '{"answer": 42}') == ('{"answer": 42}', [])


def test_llama3_and_mistral_calls() -> None:
    llama = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'
    assert _parse(LLAMA3, llama) == (None, [("add", {"a": 1, "b": 2})])
    two = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {}}'
    assert _parse(LLAMA3, two) == (None, [("add", {"a": 1, "b": 2}), ("add", {})])
    mistral = format_calls(MISTRAL, [("add", {"a": 3}), ("get_weather", {})])
    assert _parse(MISTRAL, "Sure." + mistral) == ("Sure.", [("add", {"a": 3}), ("get_weather", {})])
    # the engine drops special tokens from the text: the marker may be gone
    assert _parse(MISTRAL, '[{"name": "add", "arguments": {}}]') == (None, [("add", {})])


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = format_calls(HERMES, [("add", {"a": 1}), ("add", {"a": 2})])
    assert _parse(HERMES, text, parallel=False) == (None, [("add", {"a": 1})])


def test_a_reply_cut_short_keeps_its_whole_calls() -> None:
    text = '{"name": "add", "arguments": {"a": 1, "b": 2}}\n{"name": "add", "argu'
    assert _parse(JSON_CALLS, text) == ('{"name": "add", "argu', [("add", {"a": 1, "b": 2})])


# ---- streaming: any split of a reply gives the same text and calls

REPLIES = [
    (
        HERMES,
        'Let me see. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    ),
    (HERMES, "<tool_call>\n" + format_calls(JSON_CALLS, [("get_weather", {"city": "Rome"})])),
    (HERMES, "Plain text with a < sign and <tool_call without a call."),
    (JSON_CALLS, '\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}'),
    (JSON_CALLS, "no call here {}"),
    (MISTRAL, 'ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]'),
    (LLAMA3, '<|python_tag|>{"name": "add", "parameters": {"b": 4}}'),
]


@settings(max_examples=60, deadline=None)
@given(reply=st.sampled_from(REPLIES), cuts=st.lists(st.integers(0, 120), max_size=12))
def test_streamed_pieces_join_to_the_whole_reply(
    reply: tuple[ToolFormat, str], cuts: list[int]
) -> None:
    fmt, text = reply
    parsing = ToolParsing(fmt, NAMES, parallel=True)
    parser = parsing.parser()
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [p for a, b in itertools.pairwise(bounds) for p in parser.feed(text[a:b])]
    pieces += parser.finish()
    content, calls = parse_reply(parsing, text)
    streamed_text = "".join(p for p in pieces if isinstance(p, str))
    assert [p for p in pieces if isinstance(p, ParsedCall)] == calls
    assert streamed_text == (content or "")
    if calls:  # the text of a call never leaks as content
        assert "<tool_call>" not in streamed_text and '"arguments"' not in streamed_text


def test_stream_deltas_reassemble_to_the_response() -> None:
    """The accumulator's chunks, put together as the openai client does, equal its response."""
    text = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    acc = Accumulator(1, None, 3, ToolParsing(HERMES, NAMES, parallel=True))  # type: ignore[arg-type]
    chunks: list[ChatCompletionChunk] = []
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    for i, piece in enumerate(pieces):
        event = TokenEvent(0, i, piece, finish_reason="stop" if i == len(pieces) - 1 else None)
        acc.add(event)
        chunks += acc.chat_chunks("id", 0, "m", event, None)
    content, calls = "", {}
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    message = acc.chat_response("id", 0, "m", logprobs=False).choices[0].message
    assert message.tool_calls is not None and content == message.content == "Sure."
    assert [c.id for c in message.tool_calls] == [c["id"] for c in calls.values()]
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls.values()
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


# ---- templates without tools


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    capabilities = template_capabilities(SMOL_TEMPLATE)
    assert not capabilities.renders_tools and not capabilities.renders_tool_calls
    assert template_capabilities(QWEN_TEMPLATE).renders_tool_calls
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    messages = [
        {"role": "user", "content": "Add 1."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "3", "tool_call_id": "call_1"},
    ]
    rewritten = template_messages(capabilities, JSON_CALLS, messages, TOOLS)
    prompt = render_chat_template(SMOL_TEMPLATE, rewritten, tools=TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou can call these tools:\n")
    assert json.dumps(TOOLS[1]["function"]) in prompt
    assert '<|im_start|>assistant\n{"name": "add", "arguments": {"a": 1}}<|im_end|>' in prompt
    assert "tool_response" in prompt and "SmolLM" not in prompt


# ---- bad tool requests


def _request(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], **fields}


BAD_REQUESTS = [
    (
        _request(tools=[{"type": "function", "function": {"description": "x"}}]),
        "tools[0].function.name",
    ),
    (_request(tools=[_tool("f", {"type": "array"})]), "tools[0].function.parameters"),
    (
        _request(tools=[{**_tool("f"), "function": {"name": "f", "parameters": [1]}}]),
        "tools[0].function.parameters",
    ),
    (_request(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    (
        _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice.function.name",
    ),
    (_request(tool_choice="required"), "tool_choice"),
    (_request(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (_request(tools=[_tool("f"), _tool("f")]), "tools"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_bad_tool_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    """As parsed, or as prepared: `tool_choice` is checked against the tools offered, which
    server-side tools join after parsing."""
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(ChatCompletionRequest, body).check_tool_choice()
    assert caught.value.param == param


# ---- the forced call's grammar, on SmolLM2's vocabulary


@pytest.fixture(scope="module")
def compiler(smollm2_path: Path) -> GrammarCompiler:
    return GrammarCompiler(Tokenizer.from_gguf(read_gguf(smollm2_path).metadata, smollm2_path))


@pytest.mark.real_model
@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL, JSON_CALLS], ids=lambda f: f.name)
def test_grammar_takes_valid_calls_and_refuses_others(
    compiler: GrammarCompiler, fmt: ToolFormat
) -> None:
    tools = [Tool.model_validate(t) for t in TOOLS]
    grammar = compiler.compile("lark", tool_call_grammar(fmt, tools, parallel=True), "tools")
    valid = [("add", {"a": 1, "b": 2})] + (
        [("get_weather", {"city": "Oslo", "unit": "c"})] * fmt.parallel
    )
    invalid = [
        [("add", {"a": 1})],  # a required argument missing
        [("add", {"a": 1, "b": 2, "c": 3})],  # an argument not declared
        [("sub", {"a": 1, "b": 2})],  # not a tool
    ]
    assert _accepts(compiler, grammar.grammar, format_calls(fmt, valid).replace(" ", ""))
    for calls in invalid:
        assert not _accepts(compiler, grammar.grammar, format_calls(fmt, calls).replace(" ", ""))


class Address(BaseModel):
    city: str


class Person(BaseModel):
    name: str
    home: Address
    friends: list[Person] = []


@pytest.mark.real_model
def test_grammar_follows_the_references_of_nested_and_recursive_models(
    compiler: GrammarCompiler,
) -> None:
    """pydantic writes `#/$defs/...` references; inside the call they must still resolve."""
    tools = [
        Tool.model_validate(_tool("save", Person.model_json_schema())),
        *map(Tool.model_validate, TOOLS),
    ]
    grammar = compiler.compile("lark", tool_call_grammar(HERMES, tools, parallel=False), "tools")
    friend = {"name": "Bo", "home": {"city": "Oslo"}}
    valid = {"name": "Al", "home": {"city": "Rome"}, "friends": [friend]}
    assert _accepts(
        compiler, grammar.grammar, format_calls(HERMES, [("save", valid)]).replace(" ", "")
    )
    wrong = {"name": "Al", "home": {"town": "Rome"}}
    assert not _accepts(
        compiler, grammar.grammar, format_calls(HERMES, [("save", wrong)]).replace(" ", "")
    )


def _accepts(compiler: GrammarCompiler, grammar: str, text: str) -> bool:
    matcher = LLMatcher(compiler.ll_tokenizer, grammar, log_level=0)
    ids = compiler.ll_tokenizer.tokenize_str(text)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


# ---- forced calls on the real SmolLM2


@pytest.fixture(scope="module")
def model(smollm2_path: Path) -> Iterator[Model]:
    m = GgufModelBuilder(smollm2_path.parent, smollm2_path.name).build()
    yield m
    m.close()


def _check_calls(response: Any, schemas: dict[str, Any]) -> None:
    """Every choice is one call to a tool of `schemas` (name -> parameters), and validates."""
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.function.name in schemas
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


CASES = [
    (
        "What is the weather in Paris?",
        [_tool("get_weather", WEATHER), _tool("add", ADD)],
        "required",
    ),
    ("Add 2 and 40.", [_tool("get_weather", WEATHER), _tool("add", ADD)], "add"),
    ("Mark user 7 as urgent.", [_tool("update_user", NESTED)], "update_user"),
]


@pytest.mark.real_model
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("question", "tools", "choice"), CASES)
def test_forced_calls_always_validate(
    model: Model, question: str, tools: list[dict[str, Any]], choice: str, sampled: bool
) -> None:
    builder = RequestBuilder().add_message("user", question).set_tools(tools)
    builder.set_sampler_max_len(48)
    if choice == "required":  # else a small model may call again and again until max_tokens
        builder.set_tool_choice("required").set_parallel_tool_calls(False)
    else:  # one call to the named function, with parallel_tool_calls left at true
        builder.set_tool_choice({"type": "function", "function": {"name": choice}})
    if sampled:  # two choices decoded in one batch
        builder.set_sampler_temperature(1.0).set_sampler_seed(7).set_sampler_n_choices(2)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    allowed = schemas if choice == "required" else {choice: schemas[choice]}
    _check_calls(model.send_chat_request(builder), allowed)


_LEAF = st.one_of(
    st.builds(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 9}, st.integers(-9, 9)),
    st.builds(
        lambda v: {"enum": v}, st.sets(st.sampled_from(["on", "off", 1]), min_size=1).map(list)
    ),
    st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 6)),
)
_PROPERTIES = st.dictionaries(
    st.sampled_from(["x", "mode", "n", "flag"]), _LEAF, min_size=1, max_size=2
)
_PARAMETERS = _PROPERTIES.map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props)}
)


@pytest.mark.real_model
@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parameters=_PARAMETERS, sampled=st.booleans())
def test_random_parameter_schemas_always_validate(
    model: Model, parameters: dict[str, Any], sampled: bool
) -> None:
    request = {
        "messages": [{"role": "user", "content": "Set it up."}],
        "tools": [_tool("configure", parameters)],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 40,
        "temperature": 1.0 if sampled else 0.0,
        "seed": 3,
    }
    _check_calls(model.send_chat_request(request), {"configure": parameters})


@pytest.mark.real_model
def test_streamed_forced_call_matches_the_whole_one(model: Model) -> None:
    request = {
        "messages": [{"role": "user", "content": "Add 5 and 6."}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": 40,
        "temperature": 0.0,
    }
    whole = model.send_chat_request(request).choices[0].message
    name, arguments, content = "", "", ""
    for chunk in model.stream_chat_request(request):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            assert d.index == 0
            name += d.function.name or ""
            arguments += d.function.arguments or ""
    assert whole.tool_calls is not None and content == ""
    assert (name, arguments) == (
        whole.tool_calls[0].function.name,
        whole.tool_calls[0].function.arguments,
    )


@pytest.mark.real_model
def test_an_invalid_parameters_schema_is_refused(model: Model) -> None:
    bad = _tool("f", {"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(InvalidRequestError) as caught:
        model.send_chat_request(_request(tools=[bad]))
    assert caught.value.param == "tools[0].function.parameters"
    with pytest.raises(InvalidRequestError) as caught:
        model.send_chat_request(
            _request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
        )
    assert caught.value.param == "tool_choice"


@pytest.fixture(scope="module")
def hermes_model(smollm2_path: Path) -> Iterator[Model]:
    """SmolLM2 with a Qwen-style template: tools, calls and results rendered natively."""
    builder = GgufModelBuilder(smollm2_path.parent, smollm2_path.name)
    m = builder.with_chat_template(QWEN_TEMPLATE).build()
    yield m
    m.close()


@pytest.mark.real_model
def test_hermes_template_call_and_result_continue_the_conversation(hermes_model: Model) -> None:
    question = [{"role": "user", "content": "Add 5 and 6."}]
    request = {
        "messages": question,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": 40,
        "temperature": 0.0,
    }
    response = hermes_model.send_chat_request(request)
    _check_calls(response, {"add": ADD})
    (call,) = response.choices[0].message.tool_calls or []
    result = {"role": "tool", "tool_call_id": call.id, "content": "11"}
    turn = {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]}
    follow_up = {**request, "messages": [*question, turn, result], "tool_choice": "none"}
    prompt = hermes_model.detokenize(hermes_model.tokenize(follow_up["messages"], tools=TOOLS))
    assert f'<tool_call>\n{{"name": "add", "arguments": {call.function.arguments}}}' in prompt
    assert "<tool_response>\n11\n</tool_response>" in prompt
    answer = hermes_model.send_chat_request({**follow_up, "max_tokens": 6}).choices[0]
    assert answer.message.tool_calls is None and answer.message.content


@pytest.mark.real_model
def test_constrained_requests_without_max_tokens_are_capped(model: Model) -> None:
    """An unbounded schema would otherwise run to the end of the context."""
    forced = _request(tools=TOOLS, tool_choice="required")
    cases = [
        (forced, CONSTRAINED_MAX_TOKENS),
        (_request(response_format={"type": "json_object"}), CONSTRAINED_MAX_TOKENS),
        ({**forced, "max_tokens": 5000}, 5000),
        (_request(tools=TOOLS), None),  # auto: free text, as without tools
    ]
    for request, max_tokens in cases:
        _, _, params = model._core.prepare_chat(request)
        assert params.max_tokens == max_tokens
