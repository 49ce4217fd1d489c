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


class HostStager:
    """Moves a step's int64 arrays to the device in one copy, through a reused pinned buffer on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.int64)

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        if self.device.type == "cpu":  # the arrays are the inputs already: one concatenation, no copy
            flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
            return [t.view(a.shape) for t, a in zip(flat.split(sizes), arrays, strict=True)]
        total = sum(sizes)
        if self.buffer.numel() < total:
            self.buffer = torch.empty(
                max(total, 2 * self.buffer.numel()), dtype=torch.int64, pin_memory=self.pinned
            )
        host = self.buffer[:total]
        np.concatenate([a.ravel() for a in arrays], out=host.numpy())
        # Non-blocking from pinned memory overlaps with host work. Reusing the buffer next step is safe:
        # each step ends by reading the sampled ids back, which waits for this copy.
        flat = host.to(self.device, non_blocking=True)
        return [t.view(a.shape) for t, a in zip(flat.split(sizes), arrays, strict=True)]


def prepare_inputs(scheduler_output: SchedulerOutput, block_size: int, stager: HostStager) -> ModelInputs:
    scheduled = scheduler_output.scheduled
    query_lens = [s.num_new_tokens for s in scheduled]
    context_lens = [s.num_computed_tokens for s in scheduled]
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    token_ids = np.fromiter((t for s in scheduled for t in s.token_ids), dtype=np.int64)
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(context_lens, query_lens, strict=True)])

    max_blocks = max(len(s.block_ids) for s in scheduled)
    block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int64)
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.block_ids)] = s.block_ids
    seq_index = np.repeat(np.arange(len(scheduled)), query_lens)
    slot_mapping = block_tables[seq_index, positions // block_size] * block_size + positions % block_size

    sample_seq_indices = [i for i, s in enumerate(scheduled) if s.samples]
    sample_indices = np.array([query_start_loc[i + 1] - 1 for i in sample_seq_indices], dtype=np.int64)
    seq_lens = np.array([c + q for c, q in zip(context_lens, query_lens, strict=True)], dtype=np.int64)
    arrays = [token_ids, positions.astype(np.int64), slot_mapping, block_tables, seq_lens, sample_indices]
    ids_d, positions_d, slots_d, tables_d, seq_lens_d, sample_d = stager.stage(arrays)

    metadata = AttentionMetadata(
        slot_mapping=slots_d,
        block_tables=tables_d,
        seq_lens=seq_lens_d,
        query_start_loc=query_start_loc,
        query_lens=query_lens,
        context_lens=context_lens,
        block_size=block_size,
        decode_only=all(q == 1 for q in query_lens),
    )
    return ModelInputs(
        input_ids=ids_d,
        positions=positions_d,
        attn_metadata=metadata,
        sample_indices=sample_d,
        sample_seq_indices=sample_seq_indices,
    )
