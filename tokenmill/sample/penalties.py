"""Repetition, presence and frequency penalties, applied to a batch of logits on device.

repetition_penalty (HF / vLLM): over prompt and output tokens, positive logits are divided by the penalty
and negative ones multiplied. presence_penalty and frequency_penalty (OpenAI): over output tokens only,
`logit -= presence * (count > 0) + frequency * count`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tokenmill.sample.device import to_device
from tokenmill.sampling_params import SamplingParams

# One sequence's token ids: a list, or an int64 array that a caller keeps per request (long prompts then
# cost nothing to convert each step).
TokenIds = Sequence[int] | npt.NDArray[np.int64]


@dataclass
class PenaltyTensors:
    """Penalty parameters and token statistics of the rows of a batch."""

    repetition: torch.Tensor  # [num_rows] float32, 1.0 = off
    presence: torch.Tensor  # [num_rows] float32, 0.0 = off
    frequency: torch.Tensor  # [num_rows] float32, 0.0 = off
    output_counts: torch.Tensor  # [num_rows, vocab] int32, occurrences in each row's output
    prompt_mask: torch.Tensor | None  # [num_rows, vocab] bool, in the prompt; None: no repetition penalty

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: Sequence[TokenIds],
        output_token_ids: Sequence[TokenIds],
        vocab_size: int,
        device: torch.device,
    ) -> PenaltyTensors | None:
        """None when no row has a penalty (the fast path)."""
        if all(not has_penalties(p) for p in params):
            return None
        num_rows = len(params)
        rows = [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params]
        values = to_device(torch.tensor(rows, dtype=torch.float32), device)  # [num_rows, 3]
        output_ids: list[TokenIds] = [
            ids if has_penalties(p) else [] for p, ids in zip(params, output_token_ids, strict=True)
        ]
        output_counts = _token_counts(output_ids, num_rows, vocab_size, device)
        prompt_mask = None
        if any(p.repetition_penalty != 1.0 for p in params):
            prompt_ids: list[TokenIds] = [
                ids if p.repetition_penalty != 1.0 else []
                for p, ids in zip(params, prompt_token_ids, strict=True)
            ]
            prompt_mask = _token_counts(prompt_ids, num_rows, vocab_size, device) > 0
        return cls(values[:, 0], values[:, 1], values[:, 2], output_counts, prompt_mask)


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Penalize `logits` ([num_rows, vocab] float32) in place and return them."""
    output_mask = penalties.output_counts > 0  # [num_rows, vocab]
    seen = output_mask if penalties.prompt_mask is None else output_mask | penalties.prompt_mask
    repetition = penalties.repetition.unsqueeze(1).expand_as(logits)  # [num_rows, vocab]
    scale = torch.where(logits > 0, 1.0 / repetition, repetition)
    logits.mul_(torch.where(seen, scale, 1.0))
    logits.sub_(penalties.frequency.unsqueeze(1) * penalties.output_counts)
    logits.sub_(penalties.presence.unsqueeze(1) * output_mask)
    return logits


def _token_counts(
    token_ids: Sequence[TokenIds], num_rows: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[num_rows, vocab] int32: how often each token id occurs in each row's list (ids >= vocab dropped)."""
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device)
    # np.fromiter reads a list several times faster than torch.tensor(list): this runs every step.
    parts = [
        ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64, count=len(ids))
        for ids in token_ids
    ]
    lengths = [len(part) for part in parts]
    if not any(lengths):
        return counts
    cols = np.concatenate(parts).astype(np.int64, copy=False)
    rows = np.repeat(np.arange(num_rows), lengths)
    index = np.stack([rows, cols])[:, (cols >= 0) & (cols < vocab_size)]  # [2, num_tokens]
    rows_t, cols_t = to_device(torch.from_numpy(index), device)  # one host -> device copy
    counts.index_put_((rows_t, cols_t), torch.ones_like(cols_t, dtype=torch.int32), accumulate=True)
    return counts
