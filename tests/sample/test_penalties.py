"""Penalties against references: HF's repetition penalty and OpenAI's presence/frequency formula."""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from tokenmill.sample.penalties import PenaltyTensors, apply_penalties
from tokenmill.sampling_params import SamplingParams

VOCAB = 50
CPU = torch.device("cpu")


def random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


def test_repetition_penalty_matches_transformers() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=generator) * 3
    prompts = [random_ids(generator, 6) for _ in range(4)]
    outputs = [random_ids(generator, 4) for _ in range(4)]
    penalties = [1.3, 0.7, 1.0, 2.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    tensors = PenaltyTensors.build(params, prompts, outputs, VOCAB, CPU)
    assert tensors is not None
    result = apply_penalties(logits.clone(), tensors)
    for row, penalty in enumerate(penalties):
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        expected = processor(input_ids, logits[row : row + 1].clone())
        torch.testing.assert_close(result[row : row + 1], expected)


def test_presence_and_frequency_follow_openai() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=generator)
    prompts = [random_ids(generator, 8) for _ in range(3)]
    outputs = [random_ids(generator, 12) for _ in range(3)]
    settings = [(0.5, 0.0), (0.0, 0.4), (-1.0, 1.5)]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in settings]
    tensors = PenaltyTensors.build(params, prompts, outputs, VOCAB, CPU)
    assert tensors is not None and tensors.seen is None  # no repetition penalty: no prompt scan
    result = apply_penalties(logits.clone(), tensors)
    for row, (presence, frequency) in enumerate(settings):
        counts = torch.bincount(torch.tensor(outputs[row]), minlength=VOCAB).float()
        expected = logits[row] - frequency * counts - presence * (counts > 0).float()
        torch.testing.assert_close(result[row], expected)


def test_rows_without_penalties_are_untouched() -> None:
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5, presence_penalty=1.0)]
    tensors = PenaltyTensors.build(params, [[1, 2, 3], [1, 2, 3]], [[4, 4], [4, 4]], VOCAB, CPU)
    assert tensors is not None
    result = apply_penalties(logits.clone(), tensors)
    assert torch.equal(result[0], logits[0])
    assert not torch.equal(result[1], logits[1])


def test_no_penalties_builds_nothing() -> None:
    assert PenaltyTensors.build([SamplingParams()] * 2, [[1], [2]], [[3], [4]], VOCAB, CPU) is None


def test_numpy_rows_equal_list_rows_and_out_of_vocabulary_ids_are_dropped() -> None:
    params = [SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5)] * 2
    prompts, outputs = [[1, 2, 2, 60], [3]], [[4, 4, -1], []]
    from_lists = PenaltyTensors.build(params, prompts, outputs, VOCAB, CPU)
    arrays = [np.asarray(ids, dtype=np.int64) for ids in prompts]
    from_arrays = PenaltyTensors.build(params, arrays, outputs, VOCAB, CPU)
    assert from_lists is not None and from_arrays is not None and from_lists.seen is not None
    logits = torch.randn(2, VOCAB)
    assert torch.equal(
        apply_penalties(logits.clone(), from_lists), apply_penalties(logits.clone(), from_arrays)
    )
    assert sorted(zip(*(t.tolist() for t in from_lists.seen), strict=True)) == [
        (0, 1),
        (0, 2),
        (0, 4),
        (1, 3),
    ]
    assert from_lists.frequency_times_count.tolist() == [1.0]  # token 4 twice, at 0.5


def dense_penalties(
    logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]
) -> torch.Tensor:
    """The penalties over whole [num_rows, vocab] tensors, as the sampler applied them before."""
    rows = len(params)
    counts = torch.zeros(rows, VOCAB, dtype=torch.int32)
    prompt_mask = torch.zeros(rows, VOCAB, dtype=torch.bool)
    for row in range(rows):
        for token in outputs[row]:
            counts[row, token] += 1
        prompt_mask[row, prompts[row]] = True
    repetition = torch.tensor([p.repetition_penalty for p in params]).unsqueeze(1).expand_as(logits)
    seen = (counts > 0) | prompt_mask
    scale = torch.where(logits > 0, 1.0 / repetition, repetition)
    logits = logits * torch.where(seen, scale, 1.0)
    logits = logits - torch.tensor([p.frequency_penalty for p in params]).unsqueeze(1) * counts
    return logits - torch.tensor([p.presence_penalty for p in params]).unsqueeze(1) * (counts > 0)


def test_the_pairs_give_the_dense_result_bit_for_bit() -> None:
    """Only the pairs are touched, with the same float32 operations in the same order."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, VOCAB, generator=generator) * 4
    prompts = [random_ids(generator, 15) for _ in range(6)]
    outputs = [random_ids(generator, 20) for _ in range(6)]
    params = [
        SamplingParams(repetition_penalty=1.1),
        SamplingParams(presence_penalty=0.3, frequency_penalty=0.7),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=0.25),
        SamplingParams(frequency_penalty=-1.3),
        SamplingParams(repetition_penalty=1.7, presence_penalty=2.0),
    ]
    tensors = PenaltyTensors.build(params, prompts, outputs, VOCAB, CPU)
    assert tensors is not None
    assert torch.equal(
        apply_penalties(logits.clone(), tensors), dense_penalties(logits, params, prompts, outputs)
    )
