"""Triton decode attention over the paged KV cache: one query token per sequence, flash-decoding.

Each program takes one (sequence, KV head, split): the query heads sharing that KV head are the rows of
its tiles, so grouped-query attention reads each key/value once. Long contexts are split along the
sequence into `num_splits` partitions whose partial outputs and log-sum-exps a second kernel merges.
A sequence's partition length is derived from its own length inside the kernel, so any `num_splits` is
correct for any lengths (a fixed grid, e.g. under CUDA graphs, stays valid).
"""

from __future__ import annotations

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

# Below this many tokens per partition, splitting costs more in the merge than it wins in parallelism.
MIN_PARTITION_TOKENS = 256
MAX_SPLITS = 32


@triton.jit  # type: ignore[misc]
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int64
    seq_lens_ptr,  # [num_seqs] int64
    out_ptr,  # [num_seqs, num_heads, (num_splits,) head_dim]
    lse_ptr,  # [num_seqs, num_heads, num_splits] float32 (only with STORE_LSE)
    scale_log2,
    stride_qs,
    stride_qh,
    stride_c_kv,
    stride_c_block,
    stride_c_offset,
    stride_c_head,
    stride_bt,
    stride_bt_col,
    stride_os,
    stride_oh,
    stride_osplit,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # GROUP_SIZE padded to a power of two >= 16 (tl.dot's minimum)
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding); None: triton's default
    UPCAST_DOTS: tl.constexpr,  # float32 products (bfloat16 in the interpreter only: see upcast_dots)
    STORE_LSE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # a runtime value: one compiled kernel serves every split count
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    rows = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP_SIZE + rows
    row_mask = rows < GROUP_SIZE
    dim_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite so empty rows never produce inf - inf
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DIM_PAD], dtype=tl.float32)
    cache_head = cache_ptr + kv_head * stride_c_head
    block_row = block_table_ptr + seq * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        k, v = load_kv_tile(
            cache_head, block_row, pos, pos_mask, dims, dim_mask,
            stride_c_kv, stride_c_block, stride_c_offset, stride_bt_col, BLOCK_SIZE,
        )  # fmt: skip
        m_i, l_i, acc = attend_tile(
            q, k, v, pos_mask[None, :], m_i, l_i, acc, scale_log2, DOT_PRECISION, UPCAST_DOTS
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split (start >= seq_len) stores zeros
    out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + split * stride_osplit + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if STORE_LSE:
        has_keys = l_i > 0.0
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # empty: -inf
        num_heads = GROUP_SIZE * tl.num_programs(1)
        tl.store(lse_ptr + (seq * num_heads + heads) * num_splits + split, lse, mask=row_mask)


@triton.jit  # type: ignore[misc]
def _merge_splits_kernel(
    partial_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32, each split normalized
    lse_ptr,  # [num_seqs, num_heads, num_splits] float32, log2 domain
    out_ptr,  # [num_seqs, num_heads, head_dim]
    stride_os,
    stride_oh,
    num_splits,
    SPLITS_PAD: tl.constexpr,  # num_splits padded to a power of two
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_mask = splits < num_splits
    lse = tl.load(lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    weights = weights / tl.sum(weights, 0)
    mask = split_mask[:, None] & (dims[None, :] < HEAD_DIM)
    partial_ptrs = partial_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :]
    partial = tl.load(partial_ptrs, mask=mask, other=0.0)
    out = tl.sum(partial * weights[:, None], 0)
    out_ptrs = out_ptr + seq * stride_os + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough partitions to fill about two waves of the GPU, none shorter than MIN_PARTITION_TOKENS.

    A power of two (rounded down), so the merge kernel compiles for only a handful of padded sizes.
    """
    wanted = triton.cdiv(2 * num_sms, num_seqs * num_kv_heads)
    splits = min(wanted, max_seq_len // MIN_PARTITION_TOKENS, MAX_SPLITS)
    return 1 << (max(splits, 1).bit_length() - 1)


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int64
    seq_lens: torch.Tensor,  # [num_seqs] int64, the query token included (already in the cache)
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    *,
    block_n: int = 64,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of each sequence's one new query token over all its cached tokens."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group_size = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if query.stride(-1) != 1 or out.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("query, output and KV cache must be contiguous in head_dim")
    if num_seqs == 0:
        return out
    dim_pad = triton.next_power_of_2(head_dim)
    if num_splits == 1:
        target, lse, target_strides = out, out, (out.stride(0), out.stride(1), 0)
    else:
        shape = (num_seqs, num_heads, num_splits)
        target = torch.empty(*shape, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(*shape, dtype=torch.float32, device=query.device)
        target_strides = (target.stride(0), target.stride(1), target.stride(2))
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        target,
        lse,
        scale * LOG2_E,
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        block_tables.stride(1),
        *target_strides,
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group_size)),
        DIM_PAD=dim_pad,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(query.dtype),
        UPCAST_DOTS=upcast_dots(query.dtype),
        STORE_LSE=num_splits > 1,
        enable_fp_fusion=FP_FUSION,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            target,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            enable_fp_fusion=FP_FUSION,
        )
    return out
