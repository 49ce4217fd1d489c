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
    """The (row, token) pairs a batch's penalties change, each with its row's parameters.

    Only those pairs are read and written: a few hundred per row (its prompt and output), where a dense
    [num_rows, vocab] pass per term cost a CPU step milliseconds (16 rows: ~20 ms of a ~45 ms step).
    """

    seen: tuple[torch.Tensor, torch.Tensor] | None  # rows, tokens [num_seen] int64: in a prompt or output
    repetition: torch.Tensor  # [num_seen] float32: the penalty of the pair's row (rows with one only)
    output: tuple[torch.Tensor, torch.Tensor] | None  # rows, tokens [num_output] int64: in an output
    frequency_times_count: torch.Tensor  # [num_output] float32
    presence: torch.Tensor  # [num_output] float32

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: Sequence[TokenIds],
        output_token_ids: Sequence[TokenIds],
        vocab_size: int,
        device: torch.device,
    ) -> PenaltyTensors | None:
        """None when no row has a penalty (the fast path). Ids outside the vocabulary are dropped."""
        if all(not has_penalties(p) for p in params):
            return None
        repeating = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        counting = [i for i, p in enumerate(params) if (p.presence_penalty, p.frequency_penalty) != (0, 0)]
        seen_ids = [_concatenated(prompt_token_ids[i], output_token_ids[i]) for i in repeating]
        seen_rows, seen_tokens, _ = _unique_pairs(repeating, seen_ids, vocab_size)
        output_ids = [_as_array(output_token_ids[i]) for i in counting]
        output_rows, output_tokens, counts = _unique_pairs(counting, output_ids, vocab_size)
        per_row = np.array(
            [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
            dtype=np.float32,
        )
        pairs = np.concatenate([seen_rows, seen_tokens, output_rows, output_tokens])
        values = [per_row[seen_rows, 0], per_row[output_rows, 1] * counts.astype(np.float32)]
        values.append(per_row[output_rows, 2])
        num_seen, num_output = len(seen_rows), len(output_rows)
        rows_and_tokens = to_device(torch.from_numpy(pairs), device).split(
            [num_seen, num_seen, num_output, num_output]
        )
        repetition, frequency_times_count, presence = to_device(
            torch.from_numpy(np.concatenate(values)), device
        ).split([num_seen, num_output, num_output])
        return cls(
            seen=rows_and_tokens[0:2] if num_seen else None,
            repetition=repetition,
            output=rows_and_tokens[2:4] if num_output else None,
            frequency_times_count=frequency_times_count,
            presence=presence,
        )


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Penalize `logits` ([num_rows, vocab] float32) in place and return them: a seen token's positive
    logit divided by the repetition penalty, a negative one multiplied; then an output token's logit less
    frequency x count, less presence (the same float32 operations, in the same order, as over the dense
    [num_rows, vocab] tensors)."""
    if penalties.seen is not None:
        values = logits[penalties.seen]
        repetition = penalties.repetition
        logits[penalties.seen] = values * torch.where(values > 0, 1.0 / repetition, repetition)
    if penalties.output is not None:
        values = logits[penalties.output]
        logits[penalties.output] = values - penalties.frequency_times_count - penalties.presence
    return logits


def _as_array(ids: TokenIds) -> npt.NDArray[np.int64]:
    # np.fromiter reads a list several times faster than np.asarray or torch.tensor: this runs every step.
    return ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64, count=len(ids))


def _concatenated(first: TokenIds, second: TokenIds) -> npt.NDArray[np.int64]:
    return np.concatenate([_as_array(first), _as_array(second)]).astype(np.int64, copy=False)


def _unique_pairs(
    rows: list[int], token_ids: list[npt.NDArray[np.int64]], vocab_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The distinct (row, token) pairs of `token_ids[i]` in row `rows[i]`, and how often each occurs."""
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    tokens = np.concatenate(token_ids).astype(np.int64, copy=False)
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), [len(ids) for ids in token_ids])
    in_vocab = (tokens >= 0) & (tokens < vocab_size)
    keys, counts = np.unique(row_of[in_vocab] * vocab_size + tokens[in_vocab], return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts
