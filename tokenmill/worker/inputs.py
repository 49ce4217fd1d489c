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
    # SchedulerOutput.previous_rows on the device; input_ids are then placeholders
    previous_rows: torch.Tensor | None = None


class HostStager:
    """Moves a step's int64 arrays to the device in one copy, through reused pinned buffers on CUDA.

    Two buffers, used in turn: with async scheduling step N+1 is staged while step N's copy may still be
    queued behind step N-1 on the device; step N-1's copy, whose buffer is reused, is done by then (its
    sampled tokens have been read back).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        if self.device.type == "cpu":  # the arrays are the inputs already: one concatenation, no copy
            flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
            return [t.view(a.shape) for t, a in zip(flat.split(sizes), arrays, strict=True)]
        total = sum(sizes)
        self.buffers.reverse()
        if self.buffers[0].numel() < total:
            size = max(total, 2 * self.buffers[0].numel())
            self.buffers[0] = torch.empty(size, dtype=torch.int64, pin_memory=self.pinned)
        host = self.buffers[0][:total]
        np.concatenate([a.ravel() for a in arrays], out=host.numpy())
        flat = host.to(self.device, non_blocking=True)  # from pinned memory: overlaps with host work
        return [t.view(a.shape) for t, a in zip(flat.split(sizes), arrays, strict=True)]


def prepare_inputs(scheduler_output: SchedulerOutput, block_size: int, stager: HostStager) -> ModelInputs:
    scheduled = scheduler_output.scheduled
    query_lens = [s.num_new_tokens for s in scheduled]
    context_lens = [s.num_computed_tokens for s in scheduled]
    computes_prompt = [s.num_computed_tokens < s.request.num_prompt_tokens for s in scheduled]
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    previous_rows = scheduler_output.previous_rows
    if previous_rows is None:
        token_ids = np.fromiter((t for s in scheduled for t in s.token_ids), dtype=np.int64)
    else:  # decoding tokens not read back yet: the runner takes them from the previous step's output
        token_ids = np.zeros(len(scheduled), dtype=np.int64)
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
    if previous_rows is not None:
        arrays.append(np.asarray(previous_rows, dtype=np.int64))
    ids_d, positions_d, slots_d, tables_d, seq_lens_d, sample_d, *rows_d = stager.stage(arrays)

    metadata = AttentionMetadata(
        slot_mapping=slots_d,
        block_tables=tables_d,
        seq_lens=seq_lens_d,
        query_start_loc=query_start_loc,
        query_lens=query_lens,
        context_lens=context_lens,
        block_size=block_size,
        decode_only=all(q == 1 and not p for q, p in zip(query_lens, computes_prompt, strict=True)),
        computes_prompt=computes_prompt,
    )
    return ModelInputs(
        input_ids=ids_d,
        positions=positions_d,
        attn_metadata=metadata,
        sample_indices=sample_d,
        sample_seq_indices=sample_seq_indices,
        previous_rows=rows_d[0] if rows_d else None,
    )
