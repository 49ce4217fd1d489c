"""Triton prefill / chunked-prefill attention over the paged KV cache (decode rows welcome too).

The step's keys and values are already in the cache (written first), so every sequence attends to its
blocks only: cached prefix, earlier chunks and its new tokens alike, causally. Each program takes one tile
of BLOCK_Q consecutive query tokens of one sequence and the GROUP query heads sharing one KV head; the
tile's rows are (token, head) pairs, so grouped-query attention reads each key/value tile once. A host-built
tile list (sequence and first query token of each tile) makes one launch serve any mix of query lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.attention.triton_tiles import (
    FP_FUSION,
    LOG2_E,
    attend_tile,
    dot_precision,
    load_kv_tile,
    upcast_dots,
)
from tokenmill.sample.device import to_device as host_to_device


@triton.jit  # type: ignore[misc]
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int64
    seq_lens_ptr,  # [num_seqs] int64
    query_start_loc_ptr,  # [num_seqs + 1] int32
    tile_seq_ptr,  # [num_tiles] int32: the sequence of each tile
    tile_start_ptr,  # [num_tiles] int32: its first query token, counted within the sequence
    out_ptr,  # [num_tokens, num_heads, head_dim]
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_kv,
    stride_c_block,
    stride_c_offset,
    stride_c_head,
    stride_bt,
    stride_bt_col,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # next power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_M: tl.constexpr,  # rows per tile = BLOCK_Q tokens * GROUP_PAD heads
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding); None: triton's default
    UPCAST_DOTS: tl.constexpr,  # float32 products (bfloat16 in the interpreter only: see upcast_dots)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_tile_start = tl.load(tile_start_ptr + tile)
    q_row0 = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_row0
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM_PAD)
    token = q_tile_start + rows // GROUP_PAD  # within the sequence's new tokens
    head = kv_head * GROUP_SIZE + rows % GROUP_PAD
    row_mask = (token < query_len) & (rows % GROUP_PAD < GROUP_SIZE)
    dim_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q_off = (q_row0 + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    q_pos = context_len + token  # [BLOCK_M] absolute positions

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite so masked rows never produce inf - inf
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    # The tile's last token sees keys up to its own position; nothing beyond.
    kv_end = context_len + tl.minimum(q_tile_start + BLOCK_Q, query_len)
    cache_head = cache_ptr + kv_head * stride_c_head
    block_row = block_table_ptr + seq * stride_bt
    for tile_start in range(0, kv_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        k, v = load_kv_tile(
            cache_head, block_row, pos, pos_mask, dims, dim_mask,
            stride_c_kv, stride_c_block, stride_c_offset, stride_bt_col, BLOCK_SIZE,
        )  # fmt: skip
        causal = (pos[None, :] <= q_pos[:, None]) & pos_mask[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, causal, m_i, l_i, acc, scale_log2, DOT_PRECISION, UPCAST_DOTS)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i is 0 only on masked (unstored) rows
    o_off = (q_row0 + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@dataclass
class PrefillTiles:
    """Device-side tile list for one step; build once per step and reuse in every layer."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    tile_seq: torch.Tensor  # [num_tiles] int32
    tile_start: torch.Tensor  # [num_tiles] int32
    block_q: int  # query tokens per tile


def tokens_per_tile(group_size: int, block_m: int) -> int:
    """Query tokens in one tile of block_m rows, when each token brings its group's (padded) heads."""
    group_pad = triton.next_power_of_2(group_size)
    return max(block_m, 16, group_pad) // group_pad  # tl.dot needs at least 16 rows


def build_prefill_tiles(
    query_start_loc: list[int], group_size: int, device: torch.device, block_m: int = 64
) -> PrefillTiles:
    block_q = tokens_per_tile(group_size, block_m)
    tile_seq: list[int] = []
    tile_start: list[int] = []
    for seq, (start, end) in enumerate(zip(query_start_loc[:-1], query_start_loc[1:], strict=True)):
        starts = range(0, end - start, block_q)
        tile_seq.extend([seq] * len(starts))
        tile_start.extend(starts)

    def to_device(values: list[int]) -> torch.Tensor:  # through pinned memory: no wait for the GPU
        return host_to_device(torch.tensor(values, dtype=torch.int32), device)

    return PrefillTiles(to_device(query_start_loc), to_device(tile_seq), to_device(tile_start), block_q)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], step's K/V written
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int64
    seq_lens: torch.Tensor,  # [num_seqs] int64, after this step
    tiles: PrefillTiles,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    block_n: int = 64,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole cached context (any query lengths)."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group_size = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group_size)
    out = torch.empty_like(query) if out is None else out
    if query.stride(-1) != 1 or out.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("query, output and KV cache must be contiguous in head_dim")
    num_tiles = tiles.tile_seq.shape[0]
    if num_tiles == 0:
        return out
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        tiles.query_start_loc,
        tiles.tile_seq,
        tiles.tile_start,
        out,
        scale * LOG2_E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        block_tables.stride(1),
        GROUP_SIZE=group_size,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_Q=tiles.block_q,
        BLOCK_M=tiles.block_q * group_pad,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(query.dtype),
        UPCAST_DOTS=upcast_dots(query.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return out
