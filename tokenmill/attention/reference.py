"""Plain-torch reference for paged attention: one sequence at a time, float32, no cleverness.

Slow and obviously correct; the Triton kernels and the SDPA backend are tested against it. Also builds
random paged batches for those tests and for benchmarks/attention_check.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionMetadata


def reference_write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative entries are skipped
) -> None:
    block_size = kv_cache.shape[2]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            kv_cache[0, slot // block_size, slot % block_size] = key[token]
            kv_cache[1, slot // block_size, slot % block_size] = value[token]


def reference_gather_kv(
    kv_cache: torch.Tensor, block_table: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions 0..seq_len-1: [seq_len, num_kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    positions = torch.arange(seq_len, device=kv_cache.device)
    blocks = torch.tensor(block_table, device=kv_cache.device)[positions // block_size]
    offsets = positions % block_size
    return kv_cache[0, blocks, offsets], kv_cache[1, blocks, offsets]


def reference_sequence_attention(
    query: torch.Tensor,  # [query_len, num_heads, head_dim], positions context_len..seq_len-1
    key: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [query_len, num_heads, head_dim] float32
    query_len, num_heads = query.shape[:2]
    seq_len, num_kv_heads = key.shape[:2]
    group_size = num_heads // num_kv_heads
    k = key.float().repeat_interleave(group_size, dim=1).transpose(0, 1)  # [num_heads, seq_len, head_dim]
    v = value.float().repeat_interleave(group_size, dim=1).transpose(0, 1)
    q = query.float().transpose(0, 1)  # [num_heads, query_len, head_dim]
    scores = q @ k.transpose(1, 2) * scale  # [num_heads, query_len, seq_len]
    query_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
    visible = torch.arange(seq_len, device=query.device)[None, :] <= query_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(0, 1)


def reference_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], step's K/V written
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query's dtype
    output = torch.empty_like(query)
    block_tables = metadata.block_tables.tolist()
    for i in range(metadata.num_seqs):
        start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
        seq_len = metadata.context_lens[i] + metadata.query_lens[i]
        key, value = reference_gather_kv(kv_cache, block_tables[i], seq_len)
        output[start:end] = reference_sequence_attention(query[start:end], key, value, scale).to(query.dtype)
    return output


class ReferenceBackend:
    """The reference as an `AttentionBackend`: write the cache, then attend sequence by sequence."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        reference_write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return reference_paged_attention(query, kv_cache, metadata, scale)


@dataclass
class PagedBatch:
    """One step's inputs over a randomly filled paged cache (tests and benchmarks)."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim], a strided view of a fused QKV tensor
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], likewise
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], likewise
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], random context
    metadata: AttentionMetadata
    scale: float


def random_paged_batch(
    seqs: Sequence[tuple[int, int]],  # (context_len, query_len) of each sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PagedBatch:
    """Random K/V for every cached position, blocks handed out in a random order (block 0 only pads)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = sum(blocks_per_seq) + 2
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int64)
    slots: list[int] = []
    for i, ((context_len, query_len), count) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        block_tables[i, :count] = torch.tensor(order[:count])
        order = order[count:]
        positions = torch.arange(context_len, context_len + query_len)
        slots += (block_tables[i, positions // block_size] * block_size + positions % block_size).tolist()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    num_tokens = sum(q for _, q in seqs)
    kv_cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    kv_width = num_kv_heads * head_dim
    query, key, value = qkv.split([num_heads * head_dim, kv_width, kv_width], dim=-1)
    query_lens = [q for _, q in seqs]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([c + q for c, q in seqs], dtype=torch.int64, device=device),
        query_start_loc=[0, *itertools.accumulate(query_lens)],
        query_lens=query_lens,
        context_lens=[c for c, _ in seqs],
        block_size=block_size,
    )
    return PagedBatch(
        query=query.view(num_tokens, num_heads, head_dim),
        key=key.view(num_tokens, num_kv_heads, head_dim),
        value=value.view(num_tokens, num_kv_heads, head_dim),
        kv_cache=kv_cache,
        metadata=metadata,
        scale=head_dim**-0.5,
    )
