"""Structured output over HTTP with the `openai` client: `response_format` and `grammar`,
streaming and not; bad constraints are 400s naming the field, and the service keeps serving;
keywords the grammar cannot enforce are checked after generation, or refused under `strict`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest

from ladle.server import ServerSettings

MODEL = "smol-local:1"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    },
    "required": ["name", "legs"],
    "additionalProperties": False,
}


def _tags(items: dict[str, Any], most: int) -> dict[str, Any]:
    """Two to `most` unique tags: llguidance cannot enforce uniqueItems."""
    tags = {"type": "array", "items": items, "minItems": 2, "maxItems": most, "uniqueItems": True}
    return {
        "type": "object",
        "properties": {"tags": tags},
        "required": ["tags"],
        "additionalProperties": False,
    }


TAGS = _tags({"type": "string", "maxLength": 10}, 3)
REPEATED = _tags({"const": "web"}, 2)  # the grammar can only write {"tags":["web","web"]}
ASK = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Describe a spider as JSON."}],
    "temperature": 0,
    "max_tokens": 48,
}

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def client(serve: Callable[..., ServerSettings]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve().url}/v1", api_key="none", max_retries=0)


def _json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}}


def test_json_schema_stream_and_not_agree_and_validate(client: openai.OpenAI) -> None:
    fmt = _json_schema_format(SCHEMA)
    response = client.chat.completions.create(**ASK, response_format=fmt)  # type: ignore[call-overload]
    text = response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = client.chat.completions.create(**ASK, response_format=fmt, stream=True)  # type: ignore[call-overload]
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks]
    assert "".join(p for p, _ in pieces) == text and pieces[-1][1] == "stop"


def test_json_object_is_a_json_object(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(  # type: ignore[call-overload]
        **{**ASK, "max_tokens": 64}, response_format={"type": "json_object"}
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


def test_grammar_field_on_completions_streamed(client: openai.OpenAI) -> None:
    pattern = r" \d{4}-\d{2}-\d{2}"
    chunks = client.completions.create(
        model=MODEL,
        prompt="The date today is",
        max_tokens=16,
        stream=True,
        extra_body={"grammar": {"type": "regex", "value": pattern}},
    )
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert re.fullmatch(pattern, "".join(p for p, _ in pieces)) and pieces[-1][1] == "stop"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": _json_schema_format({"type": "nonsense"})},
         "response_format.json_schema.schema"),
        ({"extra_body": {"grammar": {"type": "regex", "value": "(unclosed"}}}, "grammar"),
    ],
)  # fmt: skip
def test_bad_constraint_is_a_400_naming_the_field_and_the_service_goes_on(
    client: openai.OpenAI, fields: dict[str, Any], param: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ASK, **fields, stream=stream)  # type: ignore[call-overload]
    assert info.value.status_code == 400
    assert info.value.body["param"] == param  # type: ignore[index]
    after = client.chat.completions.create(**{**ASK, "max_tokens": 2})  # type: ignore[call-overload]
    assert after.choices[0].message.content


@pytest.mark.parametrize("schema", [TAGS, REPEATED], ids=["tags", "repeated"])
def test_unenforced_keywords_are_checked_after_generation(
    client: openai.OpenAI, schema: dict[str, Any]
) -> None:
    fmt = _json_schema_format(schema)
    response = client.chat.completions.create(**ASK, response_format=fmt)  # type: ignore[call-overload]
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    violation = (choice.model_extra or {}).get("schema_violation")
    valid = jsonschema.Draft202012Validator(schema).is_valid(json.loads(choice.message.content))
    assert (violation is None) == valid, (choice.message.content, violation)
    if schema is REPEATED:
        assert violation == "['web', 'web'] has non-unique elements at $.tags"
    chunks = client.chat.completions.create(**ASK, response_format=fmt, stream=True)  # type: ignore[call-overload]
    last = [c.choices[0] for c in chunks if c.choices][-1]
    assert last.finish_reason == "stop"
    assert (last.model_extra or {}).get("schema_violation") == violation


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "t", "schema": TAGS, "strict": True}}},
         "response_format.json_schema.schema"),
        ({"tools": [{"type": "function",
                     "function": {"name": "tag", "parameters": TAGS, "strict": True}}]},
         "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_strict_refuses_unenforceable_keywords_naming_them(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ASK, **fields)  # type: ignore[call-overload]
    body: dict[str, Any] = info.value.body  # type: ignore[assignment]
    assert info.value.status_code == 400 and body["param"] == param
    assert "uniqueItems" in body["message"]
