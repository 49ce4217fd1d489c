"""CUDA graphs of the decode step: one graph per batch-size bucket, replayed with padded inputs.

A decode step launches hundreds of small kernels; replaying a captured graph removes their CPU launch
cost, which dominates at small batch sizes. Padded rows write their K/V into a scratch block that no
sequence owns and attend to one token of it; their outputs are dropped.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.model.registry import CausalLM
from tokenmill.worker.inputs import ModelInputs

logger = logging.getLogger(__name__)


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs, 16))
    return [*buckets, max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.model, self.device = model, device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_num_seqs,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (max_num_seqs, max_blocks), scratch_block, dtype=torch.int64, device=device
        )
        self.seq_lens = torch.ones(max_num_seqs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=list(range(batch + 1)),
            query_lens=[1] * batch,
            context_lens=[self.max_model_len - 1] * batch,  # upper bound: see AttentionMetadata
            block_size=self.block_size,
            decode_only=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        pool = None
        # Largest first, so smaller graphs reuse its memory pool. disable=None: a bar on a terminal only.
        buckets = tqdm(
            reversed(self.buckets), total=len(self.buckets), desc="Capturing CUDA graphs", disable=None
        )
        for batch in buckets:
            metadata = self._metadata(batch)
            args = (self.input_ids[:batch], self.positions[:batch], metadata)
            self.model(*args)  # warm-up outside the graph (lazy initialization, autotuning)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self.model(*args)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d CUDA graphs (batch sizes 1..%d) in %.1f s using %.2f GiB",
            len(self.graphs),
            self.buckets[-1],
            time.perf_counter() - start,
            used / (1 << 30),
        )

    def can_run(self, inputs: ModelInputs) -> bool:
        num_seqs = inputs.attn_metadata.num_seqs
        return inputs.attn_metadata.decode_only and num_seqs <= self.buckets[-1]

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """The decode step's hidden states [num_seqs, hidden_size], by graph replay."""
        metadata = inputs.attn_metadata
        num_seqs = metadata.num_seqs
        batch = next(b for b in self.buckets if b >= num_seqs)
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables, non_blocking=True)
        # Padded rows: one token in the scratch block.
        self.slot_mapping[num_seqs:batch].fill_(self.scratch_slot)
        self.seq_lens[num_seqs:batch].fill_(1)
        self.block_tables[num_seqs:batch, 0].fill_(self.scratch_block)
        self.graphs[batch].replay()
        return self.outputs[batch][:num_seqs]
