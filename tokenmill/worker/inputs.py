"""Turns a `SchedulerOutput` into the flat tensors one forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.engine.outputs import SchedulerOutput


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampling_seqs] row of each sampling sequence's last token
    sample_seq_indices: list[int]  # which scheduled sequences sample, in sample_indices order


def prepare_inputs(scheduler_output: SchedulerOutput, block_size: int, device: torch.device) -> ModelInputs:
    scheduled = scheduler_output.scheduled
    query_lens = [s.num_new_tokens for s in scheduled]
    context_lens = [s.num_computed_tokens for s in scheduled]
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    token_ids = [t for s in scheduled for t in s.token_ids]
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(context_lens, query_lens, strict=True)])

    max_blocks = max(len(s.block_ids) for s in scheduled)
    block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int64)
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.block_ids)] = s.block_ids
    seq_index = np.repeat(np.arange(len(scheduled)), query_lens)
    slot_mapping = block_tables[seq_index, positions // block_size] * block_size + positions % block_size

    sample_seq_indices = [i for i, s in enumerate(scheduled) if s.samples]
    sample_indices = [query_start_loc[i + 1] - 1 for i in sample_seq_indices]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]

    def to_device(values: object) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        block_tables=to_device(block_tables),
        seq_lens=to_device(seq_lens),
        query_start_loc=query_start_loc,
        query_lens=query_lens,
        context_lens=context_lens,
        block_size=block_size,
        decode_only=all(q == 1 for q in query_lens),
    )
    return ModelInputs(
        input_ids=to_device(token_ids),
        positions=to_device(positions),
        attn_metadata=metadata,
        sample_indices=to_device(sample_indices),
        sample_seq_indices=sample_seq_indices,
    )
