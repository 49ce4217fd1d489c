"""The batched sampler: each sampling parameter changes the tokens, seeds reproduce whatever the batch."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import (
    Sampler,
    SamplerOutput,
    apply_top_k_only,
    apply_top_k_then_top_p,
    apply_top_k_top_p,
    apply_top_p_sorted,
    argmax_rows,
)
from tokenmill.sampling_params import SamplingParams

VOCAB = 64
CPU = torch.device("cpu")


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplerOutput:
    num_rows = len(params)
    metadata = SamplingMetadata.build(
        params,
        prompts or [[] for _ in range(num_rows)],
        outputs or [[] for _ in range(num_rows)],
        generators or [None] * num_rows,
        logits.shape[-1],
        logits.device,
    )
    return Sampler()(logits, metadata)


def random_logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax_and_plain_greedy_batch_needs_no_processing() -> None:
    logits = random_logits(8)
    params = [SamplingParams(temperature=0.0)] * 8
    metadata = SamplingMetadata.build(params, [[]] * 8, [[]] * 8, [None] * 8, VOCAB, CPU)
    assert metadata.all_greedy and metadata.no_logits_processing and metadata.temperature is None
    assert metadata.no_top_k and metadata.no_top_p and metadata.no_min_p and metadata.no_penalties
    assert metadata.no_logit_bias and metadata.max_num_logprobs is None
    out = Sampler()(logits, metadata)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_rows_is_argmax_with_ties_infinities_and_nan(dtype: torch.dtype) -> None:
    """Ties go to the first index, NaN counts as the maximum (its first one), a row of -inf gives 0; rows
    of a width that is not a multiple of 8 (the CPU kernel's vectors), strided rows, one row."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (12, 1003), generator=generator).to(dtype)  # many ties in every row
    logits[1, [5, 700]] = float("inf")
    logits[2, [9, 400]] = float("nan")
    logits[3, 17] = float("nan")
    logits[3, 18] = float("inf")
    logits[4] = float("-inf")
    logits[5, 1002] = 3  # in the last, partial vector
    logits[6, 1001] = float("nan")
    logits[7] = 0.0
    logits[7, :3] = -0.0  # equal to 0.0: the first index
    expected = logits.argmax(dim=-1)
    assert expected[:8].tolist()[1:] == [5, 9, 17, 0, 1002, 1001, 0]
    assert torch.equal(argmax_rows(logits), expected)
    assert torch.equal(argmax_rows(logits[:1]), expected[:1])
    assert torch.equal(argmax_rows(logits[::2, :1000]), logits[::2, :1000].argmax(dim=-1))


def test_sampler_leaves_the_callers_logits_alone() -> None:
    logits = random_logits(4)
    before = logits.clone()
    run(
        logits,
        [SamplingParams(temperature=0.7, top_k=3, top_p=0.8, repetition_penalty=1.5)] * 4,
        [[1, 2]] * 4,
    )
    assert torch.equal(logits, before)


def test_top_k_one_is_greedy_at_high_temperature() -> None:
    logits = random_logits(256)
    out = run(logits, [SamplingParams(temperature=5.0, top_k=1)] * 256)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_top_k_keeps_only_the_k_most_likely_tokens() -> None:
    logits = random_logits(1).expand(2000, VOCAB).contiguous()
    out = run(logits, [SamplingParams(temperature=10.0, top_k=3)] * 2000)
    assert set(out.sampled_token_ids.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_k_rows_differ_in_one_batch() -> None:
    logits = random_logits(1).expand(3000, VOCAB).contiguous()
    params = [SamplingParams(temperature=10.0, top_k=k) for k in (1, 4, 0)] * 1000
    tokens = run(logits, params).sampled_token_ids.view(1000, 3)
    top4 = set(logits[0].topk(4).indices.tolist())
    assert set(tokens[:, 0].tolist()) == {int(logits[0].argmax())}
    assert set(tokens[:, 1].tolist()) == top4
    assert len(set(tokens[:, 2].tolist()) - top4) > 10


def test_tiny_top_p_is_greedy() -> None:
    logits = random_logits(256)
    out = run(logits, [SamplingParams(temperature=5.0, top_p=1e-6)] * 256)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(4000, 4).contiguous()
    tokens = run(logits, [SamplingParams(top_p=0.6)] * 4000).sampled_token_ids
    assert set(tokens.tolist()) == {0, 1}  # 0.4 < 0.6, so the 0.3 token is needed; 0.2 is not


def test_top_p_with_top_k() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(4000, 4).contiguous()
    tokens = run(logits, [SamplingParams(top_p=0.95, top_k=2)] * 4000).sampled_token_ids
    assert set(tokens.tolist()) == {0, 1}


def test_top_k_then_top_p_without_a_sort_equals_the_sorted_reference() -> None:
    logits = random_logits(6, seed=5) / 2
    top_k = torch.tensor([5, 40, 1, 20, 63, 3])
    top_p = torch.tensor([0.5, 0.9, 0.3, 1.0, 0.99, 0.7])
    fast = apply_top_k_then_top_p(logits.clone(), top_k, 63, top_p)
    reference = apply_top_p_sorted(apply_top_k_only(logits.clone(), top_k, 63), top_p)
    assert torch.equal(fast.isfinite(), reference.isfinite())
    assert torch.equal(fast[fast.isfinite()], logits[reference.isfinite()])
    assert 1 < int(fast[1].isfinite().sum()) < 40  # top_p cuts inside the top 40: both limits matter


def test_top_k_and_top_p_of_a_row_do_not_depend_on_the_batch() -> None:
    """A row's truncated logits are bit-identical alone and among rows with other (or no) top_k/top_p."""
    logits = random_logits(4, seed=6) / 2
    params = [
        SamplingParams(top_k=30, top_p=0.8),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=50, top_p=0.95),
        SamplingParams(temperature=0.0),
    ]

    def truncated(rows: list[int]) -> torch.Tensor:
        batch = [params[i] for i in rows]
        metadata = SamplingMetadata.build(
            batch, [[]] * len(rows), [[]] * len(rows), [None] * len(rows), VOCAB, CPU
        )
        return apply_top_k_top_p(logits[rows].clone(), metadata)

    together = truncated([0, 1, 2, 3])
    for row in range(3):
        assert torch.equal(truncated([row])[0], together[row])
    assert torch.equal(truncated([2, 0])[1], together[0])


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4).contiguous()
    tokens = run(logits, [SamplingParams(min_p=0.5)] * 4000).sampled_token_ids
    assert set(tokens.tolist()) == {0, 1}  # p >= 0.5 * 0.5
    tokens = run(logits, [SamplingParams(min_p=0.9)] * 4000).sampled_token_ids
    assert set(tokens.tolist()) == {0}


def test_unseeded_samples_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens = run(probs.log().expand(20000, 4).contiguous(), [SamplingParams()] * 20000).sampled_token_ids
    frequencies = torch.bincount(tokens, minlength=4).float() / 20000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


def entropy_of_samples(tokens: torch.Tensor) -> float:
    frequencies = torch.bincount(tokens, minlength=VOCAB).float() / tokens.numel()
    nonzero = frequencies[frequencies > 0]
    return float(-(nonzero * nonzero.log()).sum())


def test_temperature_controls_entropy() -> None:
    logits = random_logits(1).expand(4000, VOCAB).contiguous()
    cold = run(logits, [SamplingParams(temperature=0.05)] * 4000).sampled_token_ids
    hot = run(logits, [SamplingParams(temperature=3.0)] * 4000).sampled_token_ids
    assert entropy_of_samples(cold) < 0.1
    assert entropy_of_samples(hot) > 2.0


def test_temperature_zero_rows_are_greedy_in_a_mixed_batch() -> None:
    logits = random_logits(64)
    params = [SamplingParams(temperature=0.0 if i % 2 else 2.0, top_k=5, min_p=0.2) for i in range(64)]
    tokens = run(logits, params).sampled_token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))


def test_greedy_rows_unaffected_by_random_rows() -> None:
    logits = random_logits(3)
    alone = run(logits[1:2], [SamplingParams(temperature=0.0)]).sampled_token_ids
    params = [SamplingParams(temperature=1.5), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)]
    for _ in range(10):
        assert run(logits, params).sampled_token_ids[1] == alone[0]


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 2], logits[:, 5] = 2.0, 1.9  # token 2 wins unless penalized
    logits[2, :], logits[2, 2], logits[2, 5] = -5.0, -1.0, -1.05  # negative logits: multiplied
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)] * 3
    tokens = run(logits, params, prompts=[[2], [], []], outputs=[[], [2], [2]]).sampled_token_ids
    assert tokens.tolist() == [5, 5, 5]
    plain = run(logits, [SamplingParams(temperature=0.0)] * 3, [[2]] * 3, [[2]] * 3).sampled_token_ids
    assert plain.tolist() == [2, 2, 2]


def test_presence_penalty_over_output_only() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 2], logits[:, 5] = 2.0, 1.5
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0)] * 2
    tokens = run(logits, params, prompts=[[], [2]], outputs=[[2], []]).sampled_token_ids
    assert tokens.tolist() == [5, 2]


def test_frequency_penalty_scales_with_count() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 2], logits[:, 5] = 2.0, 1.5
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.3)] * 2
    tokens = run(logits, params, outputs=[[2], [2, 2]]).sampled_token_ids
    assert tokens.tolist() == [2, 5]  # 2 - 0.3 > 1.5 > 2 - 0.6


def test_logit_bias_forces_a_token() -> None:
    logits = random_logits(4)
    weakest = logits.argmin(dim=-1)
    params = [
        SamplingParams(temperature=t, logit_bias={int(weakest[i]): 100.0}) for i, t in enumerate([0, 1, 0, 1])
    ]
    params[3] = SamplingParams(temperature=1.0)
    tokens = run(logits, params).sampled_token_ids
    assert torch.equal(tokens[:3], weakest[:3])
    assert tokens[3] != weakest[3]


def test_allowed_token_ids_are_all_a_row_can_sample() -> None:
    logits = random_logits(4)
    weakest = logits.argmin(dim=-1)
    allowed = [[int(weakest[0])], [3, 5, 9], [3, 5, 9], None]
    temperatures = [0, 1, 0, 1]
    params = [
        SamplingParams(temperature=t, allowed_token_ids=a) for t, a in zip(temperatures, allowed, strict=True)
    ]
    for _ in range(20):
        tokens = run(logits, params).sampled_token_ids.tolist()
        assert tokens[0] == int(weakest[0]) and tokens[1] in (3, 5, 9)
        assert tokens[2] == max((3, 5, 9), key=lambda t: logits[2, t])  # greedy: the best allowed
    # The unrestricted row is left alone: over 20 draws it leaves the three tokens.
    draws = {run(logits, params).sampled_token_ids[3].item() for _ in range(20)}
    assert draws - {3, 5, 9}


def test_bad_words_never_complete() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 5], logits[:, 4], logits[:, 3] = 5.0, 4.0, 3.0  # greedy: 5, then 4, then 3
    words = [[5], [2, 3, 4]]  # a one-token word (always banned), and one whose last token is 4
    params = [SamplingParams(temperature=0.0, bad_words_token_ids=words) for _ in range(3)]
    tokens = run(logits, params, outputs=[[1], [2, 3], [3, 2]]).sampled_token_ids
    assert tokens.tolist() == [4, 3, 4]  # 5 never; 4 not right after 2, 3


def test_min_tokens_masks_stop_tokens_until_reached() -> None:
    logits = torch.zeros(4, 8)
    logits[:, 7], logits[:, 6], logits[:, 3] = 5.0, 4.0, 3.0  # 7 = eos, 6 = a stop token id
    eos = frozenset({7})
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6], eos_token_ids=eos),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6], eos_token_ids=eos),
        SamplingParams(temperature=0.0, min_tokens=2, eos_token_ids=eos, ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=0, eos_token_ids=eos),
    ]
    tokens = run(logits, params, outputs=[[1], [1, 1], [1], [1]]).sampled_token_ids
    assert tokens.tolist() == [3, 7, 7, 7]


def test_seeded_rows_reproduce_across_runs() -> None:
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)]

    def generate() -> list[list[int]]:
        generators: list[torch.Generator | None] = [seeded(1), seeded(2)]
        return [
            run(random_logits(2, seed=step), params, generators=generators).sampled_token_ids.tolist()
            for step in range(30)
        ]

    first, second = generate(), generate()
    assert first == second
    assert [a for a, _ in first] != [b for _, b in first]  # different seeds, different tokens


def test_seeded_row_is_batch_invariant() -> None:
    """The same seeded row alone and among other random (seeded or not) rows samples the same tokens."""
    target = SamplingParams(temperature=1.2, top_p=0.9, seed=42)
    row_logits = [random_logits(1, seed=100 + step) for step in range(40)]
    alone_gen = seeded(42)
    alone = [
        int(run(row_logits[s], [target], generators=[alone_gen]).sampled_token_ids[0]) for s in range(40)
    ]

    batch_gen, other_gen = seeded(42), seeded(7)
    in_batch = []
    for step in range(40):
        num_before = step % 3  # the row moves around the batch
        logits = torch.cat(
            [random_logits(num_before, seed=step), row_logits[step], random_logits(2, seed=-step)]
        )
        params = [SamplingParams(temperature=0.9)] * num_before + [
            target,
            SamplingParams(seed=7),
            SamplingParams(top_k=5),
        ]
        generators: list[torch.Generator | None] = [None] * (num_before + 3)
        generators[num_before : num_before + 2] = [batch_gen, other_gen]
        in_batch.append(int(run(logits, params, generators=generators).sampled_token_ids[num_before]))
    assert alone == in_batch


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = random_logits(3)
    params = [
        SamplingParams(temperature=0.0, logprobs=2, logit_bias={5: 50.0}),
        SamplingParams(temperature=0.3, logprobs=4, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),
    ]
    out = run(logits, params, prompts=[[1], [1, 2], []])
    assert out.logprobs is not None
    assert out.sampled_token_ids[0] == 5
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.token_ids.shape == (3, 5)  # chosen + the widest top-k of the batch
    assert torch.equal(out.logprobs.token_ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(out.logprobs.logprobs, expected.gather(1, out.logprobs.token_ids))
    assert torch.equal(out.logprobs.token_ids[:, 1:], expected.topk(4).indices)


def test_logprobs_zero_gives_the_sampled_token_only() -> None:
    out = run(random_logits(2), [SamplingParams(logprobs=0), SamplingParams()])
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (2, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype: torch.dtype) -> None:
    logits = random_logits(4).to(dtype)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, seed=3), SamplingParams(min_p=0.1)] + [
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=3)
    ]
    out = run(
        logits,
        params,
        outputs=[[1], [1], [1], [int(logits[3].argmax())]],
        generators=[None, seeded(3), None, None],
    )
    assert out.sampled_token_ids[0] == logits[0].argmax()
    assert out.logprobs is not None and out.logprobs.logprobs.dtype == torch.float32


def test_build_drops_out_of_vocab_ids_and_checks_lengths() -> None:
    params = [SamplingParams(logit_bias={VOCAB + 5: 10.0}, min_tokens=3, stop_token_ids=[VOCAB + 1])]
    metadata = SamplingMetadata.build(params, [[VOCAB + 2]], [[]], [None], VOCAB, CPU)
    assert metadata.logit_bias is None and metadata.banned_tokens is None
    with pytest.raises(ValueError, match="differ in length"):
        SamplingMetadata.build(params, [[]], [[], []], [None], VOCAB, CPU)
