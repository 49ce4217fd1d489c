"""The CPU fast paths of the sampler keep the same tokens, sample the same distribution, stay batch-invariant.

The vocabulary here is wider than FAST_PATH_CANDIDATES, so top_p takes the topk path (and sorts the rows
whose nucleus is wider), narrow rows race over their candidates only, and wide or untruncated rows invert
their cumulative sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tokenmill.sample import sampler as sampler_module
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import (
    FAST_PATH_CANDIDATES,
    Sampler,
    apply_top_p,
    apply_top_p_sorted,
    nucleus_threshold,
)
from tokenmill.sampling_params import SamplingParams

VOCAB = 4096
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fixed_default_generator() -> Iterator[None]:
    """Unseeded rows draw from the default generator: fix it here, and leave it as it was after."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def run(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None] | None = None
) -> torch.Tensor:
    num_rows = len(params)
    metadata = SamplingMetadata.build(
        params, [[]] * num_rows, [[]] * num_rows, generators or [None] * num_rows, logits.shape[-1], CPU
    )
    return Sampler()(logits, metadata).sampled_token_ids


def lm_like_logits(num_rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """A few dozen likely tokens at random places over a low, noisy floor, like a language model's."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=generator) - 6.0
    head = torch.linspace(4.0, -2.0, 40).expand(num_rows, 40)  # [num_rows, 40]
    places = torch.rand(num_rows, vocab, generator=generator).argsort(dim=-1)[:, :40]
    return logits.scatter_(1, places, head)


def reference_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """[vocab] float64 probabilities of one row after top_p, computed independently in float64."""
    probs = logits.double().softmax(dim=-1)
    sorted_probs, ids = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(dim=0) - sorted_probs
    kept = ids[mass_before < top_p]
    nucleus = torch.zeros_like(probs)
    nucleus[kept] = probs[kept]
    return nucleus / nucleus.sum()


def test_fast_top_p_keeps_the_tokens_the_full_sort_keeps() -> None:
    """Peaky rows are decided by their top tokens, flat rows fall back to the sort: same kept sets."""
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.3, 1.0, 2.0, 3.0, 5.0, 8.0]).repeat(8).unsqueeze(1)  # [48, 1]
    logits = torch.randn(48, VOCAB, generator=generator) * scales
    top_p = torch.rand(48, generator=generator) * 0.98 + 0.01
    top_p[::5] = 1.0
    top_p[1::11] = 1e-6
    decided = nucleus_threshold(logits.softmax(dim=-1).topk(FAST_PATH_CANDIDATES).values, top_p)[1]
    assert 5 < int(decided.sum()) < 43  # both paths are taken
    fast = apply_top_p(logits.clone(), top_p, cpu_fast_paths=True).isfinite()
    full = apply_top_p_sorted(logits.clone(), top_p).isfinite()
    assert torch.equal(fast, full)
    for row in range(48):
        if top_p[row] < 1.0:
            assert torch.equal(fast[row], reference_nucleus(logits[row], float(top_p[row])) > 0)


@pytest.mark.parametrize("num_tied", [3, 600])
def test_tokens_tied_at_the_cut_are_all_kept_on_both_paths(num_tied: int) -> None:
    """The nucleus ends inside a group of equal logits: the whole group stays, topk path or sort."""
    logits = torch.full((1, VOCAB), -30.0)
    logits[0, 7] = 2.0
    tied = torch.randperm(VOCAB - 8, generator=torch.Generator().manual_seed(2))[:num_tied] + 8
    logits[0, tied] = 1.0
    probs = logits.softmax(dim=-1)[0]
    top_p = torch.tensor([float(probs[7] + probs[tied[0]] * 1.5)])  # needs 2 of the tied tokens
    expected = {7, *tied.tolist()}
    for kept in (apply_top_p(logits.clone(), top_p, True), apply_top_p_sorted(logits.clone(), top_p)):
        assert set(kept[0].isfinite().nonzero().squeeze(1).tolist()) == expected


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic of sampled `tokens` against `expected` probabilities over the vocabulary."""
    observed = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert int(observed[~support].sum()) == 0, "sampled a token outside the kept set"
    counts = expected[support] * tokens.numel()
    return float(((observed[support] - counts) ** 2 / counts).sum())


def record_draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """How the sampler drew each row set, and over how many tokens: ("race", width) for an exponential
    race (the candidates), ("cdf", width) for an inverted cumulative sum (a vocabulary)."""
    draws: list[tuple[str, int]] = []
    for kind, name in (("race", "random_sample"), ("cdf", "inverse_cdf_sample")):
        monkeypatch.setattr(sampler_module, name, recording(getattr(sampler_module, name), kind, draws))
    return draws


def recording(
    draw: Callable[..., torch.Tensor], kind: str, draws: list[tuple[str, int]]
) -> Callable[..., torch.Tensor]:
    def recorded(probs: torch.Tensor, *args: Any) -> torch.Tensor:
        draws.append((kind, probs.shape[-1]))
        return draw(probs, *args)

    return recorded


def reference_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[vocab] float64 probabilities of one row after top_k."""
    kept = logits.masked_fill(logits < logits.topk(top_k).values[-1], -torch.inf)
    return kept.double().softmax(dim=-1)


SAMPLE_CASES: list[tuple[SamplingParams, Callable[[torch.Tensor], torch.Tensor]]] = [
    (SamplingParams(temperature=1.0, top_p=0.8), lambda row: reference_nucleus(row, 0.8)),
    (SamplingParams(temperature=0.7, top_p=0.95), lambda row: reference_nucleus(row / 0.7, 0.95)),
    (SamplingParams(temperature=1.3, top_k=12), lambda row: reference_top_k(row / 1.3, 12)),
]


@pytest.mark.parametrize("case", range(len(SAMPLE_CASES)))
def test_candidate_race_samples_the_kept_distribution(case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """24000 draws of one row (half seeded per row, half from the default generator) fit the reference."""
    params, reference = SAMPLE_CASES[case]
    row = lm_like_logits(1, seed=3 + case)
    expected = reference(row[0])
    draws = record_draws(monkeypatch)
    batch = row.expand(1200, VOCAB).contiguous()
    tokens = [run(batch, [params] * 1200) for _ in range(10)]
    tokens += [
        run(batch, [params] * 1200, [torch.Generator().manual_seed(1200 * step + i) for i in range(1200)])
        for step in range(10)
    ]
    assert set(draws) == {("race", FAST_PATH_CANDIDATES)}  # every race ran over the candidates only
    num_kept = int((expected > 0).sum())
    assert 5 < num_kept <= FAST_PATH_CANDIDATES
    # Degrees of freedom + 6 standard deviations: a miss of 1e-6 odds; the draws are seeded anyway.
    degrees = num_kept - 1
    assert chi_square(torch.cat(tokens), expected) < degrees + 6 * (2 * degrees) ** 0.5


def test_seeded_rows_are_batch_invariant_with_the_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow and a wide seeded row sample alike alone and among narrow, wide, greedy and seeded rows."""
    draws = record_draws(monkeypatch)
    narrow = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    wide = SamplingParams(temperature=1.0, top_p=0.99, seed=6)  # flat logits: the sort and a full race
    targets = [(narrow, 5), (wide, 6)]
    steps = [torch.cat([lm_like_logits(1, 100 + s), torch.randn(1, VOCAB) * 0.5]) for s in range(24)]

    def alone(target: int) -> list[int]:
        params, seed = targets[target]
        generator = torch.Generator().manual_seed(seed)
        return [int(run(step[target : target + 1], [params], [generator])[0]) for step in steps]

    expected = [alone(0), alone(1)]
    generators = [torch.Generator().manual_seed(seed) for _, seed in targets]
    other_seeded = torch.Generator().manual_seed(9)
    others = [
        (SamplingParams(temperature=0.9, top_p=0.9), None),
        (SamplingParams(top_p=0.999), None),
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(top_k=20, seed=9), other_seeded),
    ]
    in_batch: list[list[int]] = [[], []]
    for s, step in enumerate(steps):
        rows: list[tuple[SamplingParams, torch.Generator | None, int | None]] = [
            (narrow, generators[0], 0),
            (wide, generators[1], 1),
        ]
        rows += [(p, g, None) for p, g in others[: s % 5]]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(s)).tolist()
        rows = [rows[i] for i in order]
        logits = torch.cat([step[t] if t is not None else lm_like_logits(1, -s)[0] for _, _, t in rows])
        tokens = run(logits.view(len(rows), VOCAB), [p for p, _, _ in rows], [g for _, g, _ in rows])
        for position, (_, _, target) in enumerate(rows):
            if target is not None:
                in_batch[target].append(int(tokens[position]))
    assert in_batch == expected
    assert set(draws) == {("race", FAST_PATH_CANDIDATES), ("cdf", VOCAB)}  # both ways ran


@pytest.mark.parametrize("width", [512, 600])  # chunks of 256 tokens; of 8 (600's largest power of 2)
def test_untruncated_rows_sample_the_softmax_by_inverting_its_sum(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40000 draws of a row at temperature 0.8, half seeded per row, fit its softmax."""
    draws = record_draws(monkeypatch)
    row = torch.randn(1, width, generator=torch.Generator().manual_seed(11)) * 0.5
    params = [SamplingParams(temperature=0.8)] * 20000 + [SamplingParams(temperature=0.8, seed=1)] * 20000
    generators = [None] * 20000 + [torch.Generator().manual_seed(i) for i in range(20000)]
    tokens = run(row.expand(40000, width).contiguous(), params, generators)
    assert set(draws) == {("cdf", width)}
    expected = (row[0].double() / 0.8).softmax(dim=-1)
    degrees = width - 1
    assert chi_square(tokens, expected) < degrees + 6 * (2 * degrees) ** 0.5


@pytest.mark.parametrize("draw", [0.0, 1.0])
def test_the_inverted_sum_never_lands_on_a_token_without_probability(
    draw: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the ends of the uniform draw's range (0, and 1, which uniform_ never returns), zero-probability
    tokens before the first likely one, after the last and between them are skipped, within a chunk of
    256 tokens and across chunks (whole chunks of zeros included)."""
    probs = torch.zeros(4, 1024)
    probs[0, [2, 5]] = torch.tensor([0.25, 0.75])
    probs[1, 1023] = 1.0
    probs[2, [300, 700, 1000]] = torch.tensor([0.2, 0.3, 0.5])  # chunks 0 and 3 end empty
    probs[3, [255, 256]] = torch.tensor([0.5, 0.5])  # the last of chunk 0, the first of chunk 1
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, generator=None: self.fill_(draw))
    tokens = sampler_module.inverse_cdf_sample(probs, {}).tolist()
    assert tokens == ([2, 1023, 300, 255] if draw == 0.0 else [5, 1023, 1000, 256])


def test_the_inverted_sum_takes_each_token_in_proportion() -> None:
    """Draws spread evenly over [0, 1) land on each token in proportion to its probability, across the
    chunks: the token a draw picks is the one whose share of the running sum holds it."""
    probs = torch.zeros(1, 768)
    probs[0, [10, 300, 301, 700]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts: dict[int, int] = {}
    for step in range(1000):
        with pytest.MonkeyPatch.context() as patch:
            draw = (step + 0.5) / 1000
            patch.setattr(torch.Tensor, "uniform_", lambda self, generator=None, v=draw: self.fill_(v))
            token = int(sampler_module.inverse_cdf_sample(probs, {})[0])
        counts[token] = counts.get(token, 0) + 1
    assert counts == {10: 100, 300: 200, 301: 300, 700: 400}
