"""The Model API end to end on the real SmolLM2-135M-Instruct Q4_1 weights."""

from __future__ import annotations

import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ladle import (
    ContextLengthError,
    EngineClosedError,
    GgufModelBuilder,
    InvalidRequestError,
    Model,
    ModelLoadError,
    ModelNotFoundError,
    RequestBuilder,
    TextMessageRole,
    TextMessages,
    TextModelBuilder,
)
from ladle.cores import text as text_core
from ladle.engine.kernels import native

QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def model(smollm2_path: Path) -> Iterator[Model]:
    m = GgufModelBuilder(smollm2_path.parent, smollm2_path.name).build()
    yield m
    m.close()


def greedy(model: Model, max_tokens: int = 24, **extra: object) -> str:
    request = {"messages": QUESTION, "temperature": 0.0, "max_tokens": max_tokens, **extra}
    return model.send_chat_request(request).choices[0].message.content or ""


def test_chat_is_greedy_and_repeatable(model: Model) -> None:
    """A repeated greedy request gives the same text. The first request computes its whole
    prompt, the next ones reuse its cached prefix: on the native kernels each row's attention
    is computed alike either way, so the first answer is repeated too (SDPA's fewer query rows
    can move a logit in its last bits and flip a near-tie: "Hello!" / "Hello there" here,
    0.0014 apart)."""
    first = model.chat("Say hello.")
    second = model.chat("Say hello.")
    assert first and second and second == model.chat("Say hello.")
    if native.available():
        assert first == second


def test_response_shape_and_usage(model: Model) -> None:
    response = model.send_chat_request({"messages": QUESTION, "max_tokens": 5, "temperature": 0})
    assert response.object == "chat.completion"
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(model.tokenize(QUESTION))
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5


def test_stream_concatenates_to_the_full_reply(model: Model) -> None:
    whole = model.send_chat_request({"messages": QUESTION, "temperature": 0, "max_tokens": 24})
    full = whole.choices[0].message.content
    chunks = list(
        model.stream_chat_request(
            {
                "messages": QUESTION,
                "temperature": 0,
                "max_tokens": 24,
                "stream_options": {"include_usage": True},
            }
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_same_seed_same_text_other_seed_differs(model: Model) -> None:
    def sampled(seed: int) -> str:
        return greedy(model, temperature=1.2, top_p=0.95, seed=seed)

    assert sampled(11) == sampled(11)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1


def test_stop_string_across_tokens_is_cut_and_not_emitted(model: Model) -> None:
    full = greedy(model, max_tokens=30)
    ids = model.tokenize(full, add_special_tokens=False)
    # a stop string that starts inside one token and ends inside the next
    boundary = len(model.detokenize(ids[:6]))
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    response = model.send_chat_request(
        {"messages": QUESTION, "temperature": 0, "max_tokens": 30, "stop": [stop]}
    )
    assert response.choices[0].message.content == full[: full.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in model.stream_chat_request(
            {"messages": QUESTION, "temperature": 0, "max_tokens": 30, "stop": stop}
        )
        if c.choices
    )
    assert streamed == full[: full.find(stop)]


def test_n_choices_share_a_prompt_and_differ_when_sampled(model: Model) -> None:
    response = model.send_chat_request(
        {"messages": QUESTION, "n": 3, "temperature": 1.3, "seed": 5, "max_tokens": 12}
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    finished = [c.finish_reason for c in response.choices]
    assert set(finished) <= {"stop", "length"}
    at_least = 12 * finished.count("length") + finished.count("stop")
    assert at_least <= response.usage.completion_tokens <= 36


def test_logprobs_match_raw_logits(model: Model) -> None:
    response = model.send_chat_request(
        {
            "messages": QUESTION,
            "temperature": 0,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 3
    first = content[0]
    assert len(first.top_logprobs) == 4
    assert first.top_logprobs[0].token == first.token  # greedy picks the most likely
    logits, _ = model.send_raw_chat_request(QUESTION)
    expected = torch.log_softmax(logits, -1).max().item()
    assert first.logprob == expected  # the same logits, bit for bit


def test_logprobs_under_logit_bias_are_of_the_raw_logits(model: Model) -> None:
    logits, _ = model.send_raw_chat_request(QUESTION)
    unlikely = int(logits.argmin())  # the bias makes it the greedy pick; its logprob stays low
    response = model.send_chat_request(
        {
            "messages": QUESTION,
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": True,
            "logit_bias": {str(unlikely): 100},
        }
    )
    first = response.choices[0].logprobs.content[0]  # type: ignore[union-attr]
    expected = torch.log_softmax(logits, -1)[unlikely].item()
    assert first.logprob == expected  # the same logits, bit for bit
    assert first.logprob < -10


def test_raw_chat_request_gives_first_token_logits_and_prompt_ids(model: Model) -> None:
    logits, prompt_ids = model.send_raw_chat_request(TextMessages().add_message("user", "Hi"))
    assert prompt_ids == model.tokenize([{"role": "user", "content": "Hi"}])
    assert logits.shape == (49152,)
    reply = model.send_chat_request(
        RequestBuilder().add_message(TextMessageRole.USER, "Hi").set_sampler_max_len(1)
    )
    first_id = int(logits.argmax())
    assert reply.choices[0].message.content == model.detokenize(
        [first_id], skip_special_tokens=True
    )


def test_completion_is_plain_text_with_no_template(model: Model) -> None:
    prompt = "The three primary colours are"
    response = model.send_completion_request(
        {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True}
    )
    assert response.object == "text_completion"
    assert response.choices[0].text.startswith(prompt)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(model.tokenize(prompt))
    ids = model.tokenize(prompt)
    same = model.send_completion_request({"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert prompt + same.choices[0].text == response.choices[0].text


def test_tokenize_detokenize_round_trip(model: Model) -> None:
    text = "Tokens: naïve café, 東京, 🙂 and\tcode()"
    ids = model.tokenize(text)
    assert model.detokenize(ids) == text
    chat_ids = model.tokenize(QUESTION, add_generation_prompt=True)
    rendered = model.detokenize(chat_ids)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_config_reports_the_model(model: Model, smollm2_path: Path) -> None:
    info = model.config()
    assert info.architecture == "llama"
    assert info.max_seq_len == model.max_sequence_length() == 8192
    assert info.modalities == {"input": ["text"], "output": ["text"]}
    assert info.dtype == "float32" and info.device == "cpu" and info.file_format == "gguf"
    assert info.path == str(smollm2_path)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_invalid_requests_raise_naming_the_field(
    model: Model, body: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as e:
        model.send_chat_request({"messages": QUESTION, **body})
    assert e.value.param == param


def test_closing_a_stream_early_frees_the_engine(model: Model) -> None:
    stream = model.stream_chat_request({"messages": QUESTION, "max_tokens": 200})
    next(stream)
    next(stream)
    stream.close()  # cancels the request
    assert greedy(model, max_tokens=4)


def test_context_overflow_is_an_error_unless_truncating(smollm2_path: Path) -> None:
    with TextModelBuilder(smollm2_path).with_max_seq_len(32).build() as small:
        long_prompt = [{"role": "user", "content": "word " * 60}]
        with pytest.raises(ContextLengthError):
            small.send_chat_request({"messages": long_prompt})
        response = small.send_chat_request(
            {"messages": long_prompt, "truncate_sequence": True, "temperature": 0}
        )
        assert response.usage.prompt_tokens == 31
        assert response.usage.completion_tokens == 1  # the context is full after one token
        assert response.choices[0].finish_reason in ("length", "stop")


def test_closed_model_refuses_requests(smollm2_path: Path) -> None:
    m = TextModelBuilder(smollm2_path).build()
    m.close()
    with pytest.raises(EngineClosedError):
        m.chat("hello")


def test_models_left_open_are_closed_at_exit(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open model's daemon engine thread, still in torch while the interpreter tears down
    its thread pools, aborted the process now and then (exit 134); exit closes it first."""
    monkeypatch.setattr(text_core, "_open_engines", weakref.WeakSet())  # not other tests'
    m = TextModelBuilder(smollm2_path).build()
    assert len(text_core._open_engines) == 1
    text_core._close_open_engines()  # what `atexit` runs
    with pytest.raises(EngineClosedError):
        m.chat("hello")
    script = (
        "import sys; from ladle import TextModelBuilder; "
        "print(TextModelBuilder(sys.argv[1]).build().chat('Hi'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() and "terminate called" not in done.stderr


def test_completion_stream_matches_and_reports_usage(model: Model) -> None:
    request = {"prompt": "Counting: one, two,", "max_tokens": 6, "temperature": 0}
    whole = model.send_completion_request(request)
    chunks = list(
        model.stream_completion_request({**request, "stream_options": {"include_usage": True}})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_text_builder_takes_a_catalog_alias(
    monkeypatch: pytest.MonkeyPatch, model: Model, smollm2_path: Path, tmp_path: Path
) -> None:
    """A bare name that is no file is the catalog's: its cached model, fetched once; a path
    that is missing stays a load error naming the path."""
    cache = smollm2_path.parents[2]  # the tests' cache: the catalog's copy is fetched once
    monkeypatch.setenv("LADLE_CACHE_DIR", str(cache))
    with TextModelBuilder("smollm2-135m-instruct").build() as by_alias:
        loaded = Path(by_alias.config().path)
        assert loaded.parent.parent == cache and loaded != smollm2_path
        assert loaded.read_bytes() == smollm2_path.read_bytes()
        assert greedy(by_alias, 8) == greedy(model, 8)
    with pytest.raises(ModelNotFoundError, match="'no-such-model'"):
        TextModelBuilder("no-such-model").build()
    with pytest.raises(ModelLoadError, match=r"no-such-file\.gguf"):
        TextModelBuilder(tmp_path / "no-such-file.gguf").build()
