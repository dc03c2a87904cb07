"""Constrained generation through the Model API on the real SmolLM2: every output a constraint
lets finish parses and validates; one cut short by max_tokens is never returned as valid."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from ladle import (
    AsyncModel,
    Constraint,
    GgufModelBuilder,
    InvalidRequestError,
    Model,
    RequestBuilder,
    StructuredOutputError,
    TextMessageRole,
)
from ladle.cores.structured import parse_structured
from ladle.protocol.openai import ChatCompletionResponse

pytestmark = pytest.mark.real_model

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model(smollm2_path: Path) -> Iterator[Model]:
    m = GgufModelBuilder(smollm2_path.parent, smollm2_path.name).build()
    yield m
    m.close()


# ---- random JSON schemas whose valid outputs are short

_NAMES = st.sampled_from(["id", "name", "age", "tags", "ok", "city", "score", "kind"])
_PATTERNS = st.sampled_from(["^[a-z]{2,5}$", "^[A-Z][0-9]{2}$", "^(yes|no)$"])


@st.composite
def _integer(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(-50, 50))
    return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 500))}


@st.composite
def _number(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(-10, 10))
    return {"type": "number", "minimum": low, "maximum": low + draw(st.integers(1, 100))}


_LEAVES = st.one_of(
    _integer(),
    _number(),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
    st.builds(lambda p: {"type": "string", "pattern": p}, _PATTERNS),
    st.builds(
        lambda values: {"enum": values},
        st.lists(st.sampled_from(["red", "green", 3, True, None]), min_size=1, unique=True),
    ),
    st.just({"type": "boolean"}),
)


def _array(items: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(items, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )


def _object(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_NAMES, values, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,  # else a small model may add keys forever
        }
    )


SCHEMAS = _object(st.one_of(_LEAVES, _array(_LEAVES), _object(_LEAVES)))


def _ask(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    prompt = f"Reply with JSON matching this schema: {json.dumps(schema)}"
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "grammar": {"type": "json_schema", "value": schema},
        **extra,
    }


def _check(schema: dict[str, Any], response: ChatCompletionResponse) -> None:
    """Every finished choice validates; a choice cut short is refused by generate_structured."""
    for choice in response.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
        else:
            assert choice.finish_reason == "length"
            one = response.model_copy(update={"choices": [choice]})
            with pytest.raises(StructuredOutputError, match="length"):
                parse_structured(schema, one)


@settings(max_examples=8, deadline=None)
@given(schema=SCHEMAS)
def test_greedy_output_follows_random_schemas(model: Model, schema: dict[str, Any]) -> None:
    _check(schema, model.send_chat_request(_ask(schema, temperature=0)))


@settings(max_examples=6, deadline=None)
@given(schema=SCHEMAS, seed=st.integers(0, 1000))
def test_sampled_output_follows_random_schemas(
    model: Model, schema: dict[str, Any], seed: int
) -> None:
    response = model.send_chat_request(_ask(schema, temperature=1.0, top_p=0.95, seed=seed))
    _check(schema, response)


@settings(max_examples=2, deadline=None)
@given(schemas=st.lists(SCHEMAS, min_size=3, max_size=3))
def test_concurrent_constrained_and_free_requests_share_a_batch(
    smollm2_path: Path, schemas: list[dict[str, Any]]
) -> None:
    async def run(m: AsyncModel) -> list[ChatCompletionResponse]:
        free = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        requests = [_ask(s, temperature=0.8, seed=i, n=2) for i, s in enumerate(schemas)]
        return await asyncio.gather(*map(m.send_chat_request, [*requests, free]))

    responses = asyncio.run(_with_async_model(smollm2_path, run))
    for schema, response in zip(schemas, responses, strict=False):
        assert len(response.choices) == 2
        _check(schema, response)


async def _with_async_model(path: Path, fn: Any) -> Any:
    async with await GgufModelBuilder(path.parent, path.name).build_async() as m:
        return await fn(m)


def test_regex_and_lark_outputs_match(model: Model) -> None:
    date = model.send_chat_request(
        RequestBuilder()
        .add_message(TextMessageRole.USER, "When did Apollo 11 land on the moon?")
        .set_constraint(Constraint.regex(r"\d{4}-\d{2}-\d{2}"))
    )
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.choices[0].message.content or "")
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    reply = model.send_completion_request(
        {"prompt": "Call us at", "max_tokens": 20, "grammar": Constraint.regex(" " + phone)}
    )
    assert re.fullmatch(" " + phone, reply.choices[0].text)
    assert reply.choices[0].finish_reason == "stop"
    lark = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z ]{1,20}/'
    reply2 = model.send_chat_request(
        {
            "messages": [{"role": "user", "content": "Is water wet?"}],
            "grammar": Constraint.lark(lark),
        }
    )
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,20}", reply2.choices[0].message.content or "")


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=50_000_000)  # unbounded digits could run to max_tokens


def _asked(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 64, "temperature": 0}


def test_generate_structured_returns_a_model_instance_or_a_dict(model: Model) -> None:
    city = model.generate_structured(City, _asked("Describe Paris as JSON."))
    assert isinstance(city, City) and city.name
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    value = model.generate_structured(schema, [{"role": "user", "content": "Pick a colour."}])
    assert isinstance(value, dict) and value["colour"] in {"red", "green", "blue"}


def test_generate_structured_refuses_a_reply_cut_short(model: Model) -> None:
    request = {"messages": [{"role": "user", "content": "Describe Paris."}], "max_tokens": 3}
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        model.generate_structured(City, request)


def test_async_generate_structured(smollm2_path: Path) -> None:
    city = asyncio.run(
        _with_async_model(
            smollm2_path, lambda m: m.generate_structured(City, _asked("Rome as JSON."))
        )
    )
    assert isinstance(city, City)


def test_response_format_json_object_and_text(model: Model) -> None:
    question = [{"role": "user", "content": "Give me a JSON object about a dog."}]
    reply = model.send_chat_request(
        {"messages": question, "max_tokens": 64, "response_format": {"type": "json_object"}}
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content or ""), dict)
    plain = {"messages": question, "max_tokens": 4, "response_format": {"type": "text"}}
    assert model.send_chat_request(plain).choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"grammar": {"type": "regex", "value": "[a-"}}, "grammar"),
        ({"grammar": {"type": "lark", "value": "start: nope"}}, "grammar"),
        ({"grammar": {"type": "sql", "value": "x"}}, "grammar.type"),
        ({"grammar": Constraint.regex("a+"), "response_format": {"type": "json_object"}},
         "grammar"),
        ({"grammar": Constraint.regex("a+"), "stop": ["a"]}, "stop"),
    ],
)  # fmt: skip
def test_bad_constraints_raise_before_generation(
    model: Model, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        model.send_chat_request({"messages": [{"role": "user", "content": "Hi"}], **fields})
    assert info.value.param == param
