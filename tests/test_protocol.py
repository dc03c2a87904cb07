from __future__ import annotations

import pytest

from ladle.errors import InvalidRequestError
from ladle.messages import RequestBuilder, TextMessageRole, TextMessages
from ladle.protocol.openai import ChatCompletionRequest, CompletionRequest, parse_request

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER, "max_tokens": -5}, "max_tokens"),
        ({"messages": USER, "top_p": 1.2}, "top_p"),
        ({"messages": USER, "temperature": -1}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "logit_bias": {"5": 300}}, "logit_bias"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [USER[0], {"role": "user", "content": 5}]}, "messages[1].content"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
    ],
)
def test_bad_chat_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse_request(ChatCompletionRequest, body)
    assert e.value.param == param


def test_content_parts_are_joined_for_text_models() -> None:
    req = parse_request(
        ChatCompletionRequest,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
                }
            ]
        },
    )
    assert req.messages[0].to_template_dict() == {"role": "user", "content": "one two"}


def test_completion_prompt_may_be_token_ids() -> None:
    req = parse_request(CompletionRequest, {"prompt": [1, 2, 3]})
    assert req.prompt == [1, 2, 3]
    assert req.max_tokens == 16  # OpenAI's default for completions


def test_text_messages_are_greedy() -> None:
    req = TextMessages().add_message(TextMessageRole.USER, "hello").to_request()
    assert req.temperature == 0.0
    assert req.messages[0].role == "user"


def test_request_builder_sets_sampling_fields() -> None:
    req = (
        RequestBuilder()
        .add_message("system", "be brief")
        .add_message(TextMessageRole.USER, "hi")
        .set_sampler_temperature(0.8)
        .set_sampler_topp(0.9)
        .set_sampler_topk(40)
        .set_sampler_max_len(12)
        .set_sampler_stop_toks(["\n"])
        .set_sampler_n_choices(2)
        .return_logprobs(True)
        .set_sampler_topn_logprobs(3)
        .with_truncate_sequence(True)
        .to_request()
    )
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (0.8, 0.9, 40, 12)
    assert (req.stop, req.n, req.logprobs, req.top_logprobs) == (["\n"], 2, True, 3)
    assert req.truncate_sequence


def test_request_builder_rejects_unknown_role() -> None:
    with pytest.raises(InvalidRequestError) as e:
        RequestBuilder().add_message("wizard", "x")
    assert e.value.param == "role"
