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
    assert tensors is not None and tensors.prompt_mask is None  # no repetition penalty: no prompt scan
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


def test_numpy_rows_equal_list_rows() -> None:
    params = [SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5)] * 2
    prompts, outputs = [[1, 2, 2, 60], [3]], [[4, 4], []]
    from_lists = PenaltyTensors.build(params, prompts, outputs, VOCAB, CPU)
    arrays = [np.asarray(ids, dtype=np.int64) for ids in prompts]
    from_arrays = PenaltyTensors.build(params, arrays, outputs, VOCAB, CPU)
    assert from_lists is not None and from_arrays is not None
    assert from_lists.prompt_mask is not None and from_arrays.prompt_mask is not None
    assert torch.equal(from_lists.prompt_mask, from_arrays.prompt_mask)
    assert from_lists.prompt_mask.sum() == 3  # 60 is outside the vocabulary
    assert torch.equal(from_lists.output_counts[0, 4], torch.tensor(2, dtype=torch.int32))
