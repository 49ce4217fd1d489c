"""Logprobs on device, their single-transfer host copy and their user-facing form."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.engine.outputs import Logprob, LogprobsLists
from tokenmill.sample.logprobs import LogprobsTensors, compute_logprobs, to_sample_logprobs


def test_compute_logprobs_matches_log_softmax() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 4
    chosen = torch.tensor([0, 17, 499, 3, 250, 42])
    result = compute_logprobs(logits, chosen, num_top=20)
    expected = torch.log_softmax(logits.double(), dim=-1)
    top = expected.topk(20)
    assert torch.equal(result.token_ids[:, 0], chosen)
    assert torch.equal(result.token_ids[:, 1:], top.indices)
    torch.testing.assert_close(result.logprobs[:, 1:].double(), top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        result.logprobs[:, 0].double(), expected.gather(1, chosen.unsqueeze(1)).squeeze(1), atol=1e-5, rtol=0
    )


def test_ranks_count_strictly_better_tokens() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]] * 4)
    chosen = torch.tensor([1, 2, 4, 3])
    assert compute_logprobs(logits, chosen, num_top=2).ranks.tolist() == [1, 3, 5, 1]


def test_logprobs_computed_in_float32_from_bfloat16() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    result = compute_logprobs(logits, torch.tensor([5, 6]), num_top=5)
    assert result.logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(result.logprobs, expected.gather(1, result.token_ids), atol=1e-6, rtol=0)


def test_num_top_zero_keeps_the_chosen_token() -> None:
    result = compute_logprobs(torch.randn(3, 10), torch.tensor([1, 2, 3]), num_top=0)
    assert result.token_ids.shape == result.logprobs.shape == (3, 1)


def test_prompt_logprobs_chosen_are_the_next_prompt_tokens() -> None:
    """How the runner uses it for prompt logprobs: the logits at position i score prompt token i + 1."""
    prompt = torch.tensor([5, 9, 2, 7])
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))  # one row per prompt position
    result = compute_logprobs(logits[:-1], prompt[1:], num_top=3)
    lists = result.tolists()
    assert [row[0] for row in lists.token_ids] == [9, 2, 7]
    expected = torch.log_softmax(logits[:-1], dim=-1)
    for position, token in enumerate([9, 2, 7]):
        assert lists.logprobs[position][0] == pytest.approx(float(expected[position, token]), abs=1e-6)


def test_tolists_round_trips_exactly() -> None:
    logits = torch.randn(5, 70000, generator=torch.Generator().manual_seed(3))
    result = compute_logprobs(logits, torch.tensor([69999, 0, 1234, 65536, 7]), num_top=4)
    lists = result.tolists()
    assert lists.token_ids == result.token_ids.tolist()
    assert lists.logprobs == result.logprobs.tolist()
    assert lists.ranks == result.ranks.tolist()
    assert all(isinstance(t, int) for row in lists.token_ids for t in row)
    assert result.slice(1, 3).tolists() == lists.slice(1, 3)


class FakeTokenizer:
    def batch_decode(self, sequences: list[list[int]]) -> list[str]:
        return [f"<{ids[0]}>" for ids in sequences]


def test_to_sample_logprobs_keeps_each_rows_own_top_n() -> None:
    lists = LogprobsLists(
        token_ids=[[7, 7, 3, 1], [9, 3, 7, 1]],
        logprobs=[[-0.1, -0.1, -2.0, -3.0], [-5.0, -0.5, -1.0, -2.0]],
        ranks=[1, 8],
    )
    result = to_sample_logprobs(lists, FakeTokenizer(), [3, 1])
    assert result[0] == {
        7: Logprob(-0.1, 1, "<7>"),
        3: Logprob(-2.0, 2, "<3>"),
        1: Logprob(-3.0, 3, "<1>"),
    }
    assert result[1] == {9: Logprob(-5.0, 8, "<9>"), 3: Logprob(-0.5, 1, "<3>")}
    assert list(result[1]) == [9, 3]  # the chosen token first
    assert to_sample_logprobs(lists, FakeTokenizer(), 0) == [
        {7: Logprob(-0.1, 1, "<7>")},
        {9: Logprob(-5.0, 8, "<9>")},
    ]


def test_decoded_tokens_with_the_real_tokenizer(smollm2_tokenizer: Any) -> None:
    """decoded_token is the decode of the single id, as vLLM: a byte of a split character is U+FFFD."""
    hello, emoji_start = smollm2_tokenizer.encode("Hello")[0], smollm2_tokenizer.encode(" 😀")[0]
    eos = smollm2_tokenizer.eos_token_id
    lists = LogprobsLists(token_ids=[[hello, emoji_start, eos]], logprobs=[[-0.1, -1.0, -2.0]], ranks=[1])
    (row,) = to_sample_logprobs(lists, smollm2_tokenizer, 2)
    assert [entry.decoded_token for entry in row.values()] == [
        "Hello",
        smollm2_tokenizer.decode([emoji_start]),
        "<|im_end|>",
    ]
    assert (row[emoji_start].decoded_token or "").endswith("\ufffd")


def test_to_sample_logprobs_checks_row_counts() -> None:
    lists = LogprobsTensors(torch.tensor([[1]]), torch.tensor([[-0.5]]), torch.tensor([1])).tolists()
    with pytest.raises(ValueError, match="num_top_per_row"):
        to_sample_logprobs(lists, FakeTokenizer(), [1, 2])
