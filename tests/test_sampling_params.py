"""SamplingParams: vLLM's defaults and normalizations; every invalid value names its field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tokenmill.sampling_params import RequestOutputKind, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-300),  # 0 in float32: inf and NaN logits
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -1),
        ("stop", [""]),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [-1]),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {5: -100.5}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
        # Wrong types name their field too (not a TypeError from a comparison, nor 1.5 tokens).
        ("n", 1.5),
        ("n", "2"),
        ("top_k", 2.5),
        ("max_tokens", 2.5),
        ("min_tokens", "1"),
        ("logprobs", 1.0),
        ("seed", "x"),
        ("seed", 2**70),
        ("temperature", "hot"),
        ("top_p", None),
        ("stop_token_ids", ["a"]),
        ("stop", 5),
        ("stop_token_ids", 5),
        ("logit_bias", {1: "x"}),
        ("logit_bias", [1, 2]),
        ("logit_bias", {True: 1.0}),
        # A bool is no count, and an infinity passes the open-ended ranges: both rejected.
        ("n", True),
        ("logprobs", True),
        ("temperature", float("inf")),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", float("-inf")),
        ("output_kind", "delta"),
        # best_of > n (vLLM V0's beam of candidates) is not supported, as in vLLM V1.
        ("best_of", 2),
        ("best_of", "1"),
        # Bounded: each is checked at every token.
        ("stop", [f"s{i}" for i in range(1025)]),
        ("stop", ["x" * 4097]),
        ("stop_token_ids", list(range(1025))),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [-1]),
        ("allowed_token_ids", ["a"]),
        ("allowed_token_ids", 5),
        ("bad_words", ["ok", " "]),
        ("bad_words", "word"),
        ("bad_words", [3]),
    ],
)
def test_invalid_value_raises_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_best_of_unset_or_equal_to_n_is_accepted() -> None:
    assert SamplingParams(best_of=None).best_of is None
    assert SamplingParams(n=3, best_of=3).n == 3


def test_output_kind_enum_is_accepted() -> None:
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).output_kind is RequestOutputKind.DELTA


def test_numpy_numbers_are_accepted() -> None:
    params = SamplingParams(
        n=np.int64(2), temperature=np.float32(0.5), seed=np.int64(7), stop_token_ids=[np.int64(3)]
    )
    assert params.n == 2 and params.seed == 7


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="^min_tokens .*max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10


def test_token_ids_checked_against_the_vocabulary() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).validate_token_ids(100)
    with pytest.raises(ValueError, match="^logit_bias .*100"):
        SamplingParams(logit_bias={100: 1.0}).validate_token_ids(100)
    with pytest.raises(ValueError, match="^stop_token_ids .*100"):
        SamplingParams(stop_token_ids=[100]).validate_token_ids(100)
    with pytest.raises(ValueError, match="^allowed_token_ids .*100"):
        SamplingParams(allowed_token_ids=[5, 100]).validate_token_ids(100)
    assert SamplingParams(allowed_token_ids=(5, 6)).allowed_token_ids == [5, 6]


def test_normalizations() -> None:
    params = SamplingParams(stop="###", top_k=-1)
    assert params.stop == ["###"] and params.stop_strings == ["###"]
    assert params.top_k == 0
    assert params.stop_token_ids == []
    from_tuples = SamplingParams(stop=("a", "b"), stop_token_ids=(3,))
    assert from_tuples.stop == ["a", "b"] and from_tuples.stop_token_ids == [3]


def test_greedy_below_sampling_eps() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_all_stop_token_ids() -> None:
    params = SamplingParams(stop_token_ids=[5], eos_token_ids=frozenset({2}))
    assert params.all_stop_token_ids == {2, 5}
    ignoring = SamplingParams(stop_token_ids=[5], eos_token_ids=frozenset({2}), ignore_eos=True)
    assert ignoring.all_stop_token_ids == {5}


def test_validate_with_a_smaller_logprobs_limit() -> None:
    params = SamplingParams(logprobs=8)
    with pytest.raises(ValueError, match="^logprobs "):
        params.validate(max_logprobs=5)


def test_no_logprobs_limit_with_max_logprobs_minus_one() -> None:
    params = SamplingParams()
    params.logprobs, params.prompt_logprobs = 100, 50
    params.validate(max_logprobs=-1)
    with pytest.raises(ValueError, match="^logprobs "):
        params.validate()


def test_the_logprobs_limit_is_the_engines_not_the_params() -> None:
    # --max-logprobs may raise it past the default 20 (or lift it, -1): checked when a request is added.
    params = SamplingParams(logprobs=30, prompt_logprobs=25)
    params.validate(max_logprobs=30)
    params.validate(max_logprobs=-1)
    with pytest.raises(ValueError, match="^logprobs must be between 0 and 20"):
        params.validate(max_logprobs=20)
    with pytest.raises(ValueError, match="^logprobs must be non-negative"):
        SamplingParams(logprobs=-1)
