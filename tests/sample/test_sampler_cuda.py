"""The sampler on CUDA: same results as on CPU where deterministic, seeds batch-invariant, no host syncs."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sample.logprobs import compute_logprobs
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import Sampler, SamplerOutput
from tokenmill.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 32000
CUDA = torch.device("cuda")


def build(
    params: list[SamplingParams],
    device: torch.device,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    num_rows = len(params)
    return SamplingMetadata.build(
        params,
        [[1, 2, 3, 4]] * num_rows,
        outputs or [[5, 5, 6]] * num_rows,
        generators or [None] * num_rows,
        VOCAB,
        device,
    )


def random_logits(num_rows: int, seed: int) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


MIXED = [
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
    SamplingParams(temperature=0.0, logit_bias={7: 30.0}, min_tokens=9, eos_token_ids=frozenset({0})),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=3, logprobs=20),
    SamplingParams(temperature=1.2, top_p=0.5),
    SamplingParams(temperature=0.7, top_k=1),
]


def test_forward_makes_no_host_syncs() -> None:
    """Any synchronizing CUDA call (.item(), .tolist(), a blocking copy) in the sampler raises."""
    logits = random_logits(len(MIXED), 0).to(CUDA, torch.bfloat16)
    generators: list[torch.Generator | None] = [None] * len(MIXED)
    generators[3] = torch.Generator(device=CUDA).manual_seed(3)
    metadata = build(MIXED, CUDA, generators=generators)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Sampler()(logits, metadata)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.device.type == "cuda"


def test_deterministic_rows_match_cpu() -> None:
    logits = random_logits(len(MIXED), 1)
    on_cpu = Sampler()(logits, build(MIXED, torch.device("cpu")))
    on_cuda = Sampler()(logits.to(CUDA), build(MIXED, CUDA))
    greedy_rows = [0, 1, 2, 5]
    assert (
        on_cuda.sampled_token_ids.cpu()[greedy_rows].tolist()
        == on_cpu.sampled_token_ids[greedy_rows].tolist()
    )
    assert on_cuda.logprobs is not None and on_cpu.logprobs is not None
    cpu_lists, cuda_lists = on_cpu.logprobs.tolists(), on_cuda.logprobs.tolists()
    assert cuda_lists.token_ids[0] == cpu_lists.token_ids[0]
    assert cuda_lists.logprobs[0] == pytest.approx(cpu_lists.logprobs[0], abs=1e-4)


def test_seeded_row_is_batch_invariant_on_cuda() -> None:
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    steps = [random_logits(1, 100 + s).to(CUDA) for s in range(20)]
    alone_gen = torch.Generator(device=CUDA).manual_seed(11)
    alone = [
        int(Sampler()(steps[s], build([target], CUDA, generators=[alone_gen])).sampled_token_ids[0])
        for s in range(20)
    ]
    batch_gen = torch.Generator(device=CUDA).manual_seed(11)
    in_batch = []
    for s in range(20):
        others = random_logits(5, s).to(CUDA)
        logits = torch.cat([others[: s % 4], steps[s], others[s % 4 :]])
        params = [SamplingParams(temperature=0.9, top_k=50)] * 5
        params.insert(s % 4, target)
        generators: list[torch.Generator | None] = [None] * 6
        generators[s % 4] = batch_gen
        out = Sampler()(logits, build(params, CUDA, generators=generators))
        in_batch.append(int(out.sampled_token_ids[s % 4]))
    assert alone == in_batch


def test_top_k_and_top_p_sets_on_cuda() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], device=CUDA).log().expand(4000, 4).contiguous()
    params = [SamplingParams(top_p=0.6)] * 2000 + [SamplingParams(top_k=3, temperature=5.0)] * 2000
    metadata = SamplingMetadata.build(params, [[]] * 4000, [[]] * 4000, [None] * 4000, 4, CUDA)
    tokens = Sampler()(logits, metadata).sampled_token_ids.cpu()
    assert set(tokens[:2000].tolist()) == {0, 1}
    assert set(tokens[2000:].tolist()) == {0, 1, 2}


def test_compute_logprobs_on_cuda_matches_cpu() -> None:
    logits = random_logits(8, 2)
    chosen = torch.arange(8) * 1000
    on_cpu = compute_logprobs(logits, chosen, 20).tolists()
    on_cuda = compute_logprobs(logits.to(CUDA), chosen.to(CUDA), 20).tolists()
    assert on_cuda.token_ids == on_cpu.token_ids and on_cuda.ranks == on_cpu.ranks
    for a, b in zip(on_cuda.logprobs, on_cpu.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_output_type() -> None:
    out: SamplerOutput = Sampler()(random_logits(2, 3).to(CUDA), build([SamplingParams()] * 2, CUDA))
    assert out.sampled_token_ids.dtype == torch.int64
