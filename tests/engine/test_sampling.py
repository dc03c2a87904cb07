from __future__ import annotations

import pytest
import torch

from ladle.engine.sampling import Sampler, SamplingParams, top_logprobs
from ladle.errors import InvalidRequestError


def draws(params: SamplingParams, logits: torch.Tensor, seed: int, n: int = 50) -> list[int]:
    sampler = Sampler(params, [], seed)
    return [sampler.sample(sampler.process(logits.clone())) for _ in range(n)]


def test_greedy_picks_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert draws(SamplingParams(temperature=0.0), logits, seed=0, n=3) == [1, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_takes_the_first_maximum_in_any_dtype(dtype: torch.dtype) -> None:
    logits = torch.tensor([0.5, 2.0, -1.0, 2.0, 1.0], dtype=dtype)
    assert Sampler(SamplingParams(temperature=0.0), [], 0).sample(logits) == 1
    strided = torch.tensor([[0.0, 3.0], [1.0, 0.0], [3.0, 5.0]], dtype=dtype)[:, 0]  # a column
    assert Sampler(SamplingParams(temperature=0.0), [], 0).sample(strided) == 2


def test_same_seed_same_draws_and_other_seed_differs() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5)
    assert draws(params, logits, seed=7) == draws(params, logits, seed=7)
    assert draws(params, logits, seed=7) != draws(params, logits, seed=8)


def test_draws_follow_the_distribution_and_never_pick_a_zero() -> None:
    """20,000 seeded draws: each frequency within 0.015 of its probability (5 standard
    deviations at p = 0.5), the masked token (probability 0, first and last) never."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    picked = draws(SamplingParams(temperature=1.0), probs.log(), seed=3, n=20_000)
    got = torch.bincount(torch.tensor(picked), minlength=6)
    assert got[[0, 2, 5]].tolist() == [0, 0, 0]
    torch.testing.assert_close(got.float() / 20_000, probs, rtol=0, atol=0.015)


def test_a_draw_that_rounds_up_to_the_total_takes_the_last_possible_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """u * total may round to the total itself (u just under 1): no cumulative sum exceeds
    it, and the draw must still be a token, one of nonzero probability."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None: torch.ones(*size))
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    assert draws(SamplingParams(temperature=1.0), probs.log(), seed=3, n=3) == [4, 4, 4]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),  # logits / T overflow to +-inf: softmax is NaN
        SamplingParams(temperature=5e-324),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300),  # seen tokens to inf
    ],
)
def test_a_row_that_overflows_draws_its_most_likely_token(params: SamplingParams) -> None:
    """Found by fuzzing the service: such a draw returned the vocabulary's size as a token,
    and the next step indexed the embedding out of range (a 500)."""
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0])
    sampler = Sampler(params, [3], seed=0)
    picked = [sampler.sample(sampler.process(logits.clone())) for _ in range(5)]
    expected = 3 if params.repetition_penalty != 1.0 else 1  # the penalty blew token 3 up
    assert picked == [expected] * 5


def test_top_k_restricts_to_k_best() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert set(draws(SamplingParams(temperature=5.0, top_k=2), logits, seed=0, n=200)) == {0, 1}


def test_top_p_keeps_the_token_that_crosses_the_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.7), probs.log(), seed=0, n=300))
    assert got == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    got = set(draws(SamplingParams(temperature=1.0, min_p=0.1), probs.log(), seed=0, n=300))
    assert got == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], seed=0)
    out = sampler.process(torch.tensor([4.0, -4.0, 4.0]))
    assert out.tolist() == [2.0, -8.0, 4.0]


def test_presence_and_frequency_penalties_follow_openai() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, prompt_ids=[2], seed=0)  # prompt tokens are not penalised
    for t in (0, 0, 0, 1):
        sampler.record(t)
    out = sampler.process(torch.zeros(3))
    assert out.tolist() == pytest.approx([-(0.25 * 3 + 0.5), -(0.25 + 0.5), 0.0])


def test_logit_bias_can_force_a_token() -> None:
    logits = torch.tensor([3.0, 0.0, 0.0])
    params = SamplingParams(temperature=0.0, logit_bias={2: 100.0})
    assert draws(params, logits, seed=0, n=1) == [2]


def test_logit_bias_adds_to_its_tokens_only_in_place() -> None:
    sampler = Sampler(SamplingParams(logit_bias={4: -100.0, 1: 0.5, 3: 2.0}), [], 0)
    for _ in range(2):  # the ids are checked once; the bias applies every step
        logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
        out = sampler.process(logits)
        assert out.tolist() == [1.0, 2.5, 3.0, 6.0, -95.0]
        assert out.data_ptr() == logits.data_ptr()  # the engine's row, not a copy of it


def test_logit_bias_outside_vocab_is_an_invalid_request() -> None:
    sampler = Sampler(SamplingParams(logit_bias={10: 1.0}), [], 0)
    with pytest.raises(InvalidRequestError) as e:
        sampler.process(torch.zeros(3))
    assert e.value.param == "logit_bias"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", -1), ("top_p", 1.5), ("top_p", 0.0), ("temperature", -0.1), ("n", 0)],
)
def test_invalid_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_top_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    chosen, top = top_logprobs(logits, 0, 2)
    ref = torch.log_softmax(logits, -1)
    assert chosen == pytest.approx(float(ref[0]))
    assert [i for i, _ in top] == [2, 1]
    assert top[0][1] == pytest.approx(float(ref[2]))
