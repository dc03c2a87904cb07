"""The engine's limits as a user sets them: a KV budget, sequences per step."""

from __future__ import annotations

from pathlib import Path

import pytest

from ladle import GgufModelBuilder
from ladle.errors import ContextLengthError, InvalidRequestError
from ladle.server.app import ServerSettings


def test_a_kv_budget_caps_the_context_and_still_serves(smollm2_path: Path) -> None:
    with GgufModelBuilder(smollm2_path).with_kv_cache_tokens(200).build() as model:
        assert model.max_sequence_length() == 208  # rounded up to whole 16-token blocks
        reply = model.send_completion_request({"prompt": "word " * 190, "max_tokens": 400})
        usage = reply.usage
        assert usage.prompt_tokens + usage.completion_tokens == 208  # not 590
        assert reply.choices[0].finish_reason == "length"
        with pytest.raises(ContextLengthError):
            model.send_completion_request({"prompt": "word " * 300, "max_tokens": 1})


@pytest.mark.parametrize(
    ("field", "value"), [("kv_cache_tokens", 1), ("max_num_seqs", 0), ("num_threads", 0)]
)
def test_bad_engine_limits_name_the_setting(field: str, value: int) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        ServerSettings(**{field: value})  # type: ignore[arg-type]
    assert caught.value.param == field


def test_builder_rejects_a_tiny_kv_budget(smollm2_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        GgufModelBuilder(smollm2_path).with_kv_cache_tokens(1)
    assert caught.value.param == "kv_cache_tokens"
