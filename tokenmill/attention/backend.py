"""The attention backend seam: metadata built once per step by the runner, read by every layer.

A backend writes the step's new keys/values into the paged KV cache and computes attention of the step's
queries over each sequence's cached context (prefix-cache hits and earlier chunks included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where each of the step's tokens goes in the cache and what each sequence attends to.

    Tokens of sequence i are rows query_start_loc[i]:query_start_loc[i+1] of the flattened batch; it has
    context_lens[i] tokens cached before this step and seq_lens[i] = context_lens[i] + query_lens[i] after.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64 (on device)
    query_start_loc: list[int]  # [num_seqs + 1], host copy
    query_lens: list[int]  # [num_seqs], host copy
    context_lens: list[int]  # [num_seqs], host copy
    block_size: int
    # True for a step where every sequence has exactly one new token. CUDA graphs are captured only for
    # such steps, with context_lens holding an upper bound (max_model_len - 1) rather than each
    # sequence's value: a backend that supports graphs must read per-sequence lengths from `seq_lens`
    # (device) and use the host lists only to size its launch grid.
    decode_only: bool = False
    # Per sequence, whether the step computes prompt tokens of it (a prefill chunk, even of one token: a
    # prompt's last token then attends as in its whole prefill). None: those with several query tokens.
    computes_prompt: list[bool] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def decode_rows(self) -> list[int]:
        """The sequences that decode: one query token, a generated one."""
        prompt = self.computes_prompt or [False] * len(self.query_lens)
        return [i for i, (q, p) in enumerate(zip(self.query_lens, prompt, strict=True)) if q == 1 and not p]

    @property
    def max_seq_len(self) -> int:
        return max(c + q for c, q in zip(self.context_lens, self.query_lens, strict=True))


class AttentionBackend(Protocol):
    supports_cuda_graphs: bool  # its decode path honours the `decode_only` contract above

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)
