"""What the Triton attention kernels share: launch options and the two steps of their key loop.

Both the decode and the prefill kernel walk a sequence's paged cache one tile of BLOCK_N positions at a
time: `load_kv_tile` gathers the tile's keys and values through the block table, and `attend_tile`
folds them into a flash-attention running state (row maxima, row sums and the weighted sum, in the log2
domain). Triton inlines these into each kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Passed explicitly: triton >= 3.9 warns when it is left to the default, which 3.10 flips to off.
FP_FUSION = True
LOG2_E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: full float32 for float32 inputs (the default would round through TF32)."""
    return "ieee" if dtype == torch.float32 else None


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether `attend_tile` multiplies in float32: only for bfloat16 in triton's interpreter, whose
    bfloat16 tl.dot is wrong (errors of 1e10 in triton 3.6); compiled kernels multiply in bfloat16."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit  # type: ignore[misc]
def load_kv_tile(
    cache_head,  # the cache's keys at this KV head; its values are stride_c_kv further
    block_row,  # the sequence's block-table row
    pos,  # [BLOCK_N] positions within the sequence
    pos_mask,  # [BLOCK_N] which positions to load
    dims,  # [DIM_PAD]
    dim_mask,  # [DIM_PAD]
    stride_c_kv,
    stride_c_block,
    stride_c_offset,
    stride_bt_col,
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
):
    block = tl.load(block_row + (pos // BLOCK_SIZE) * stride_bt_col, mask=pos_mask, other=0)
    kv_off = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_offset  # [BLOCK_N]
    kv_mask = pos_mask[:, None] & dim_mask[None, :]
    k = tl.load(cache_head + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(cache_head + stride_c_kv + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    return k, v  # [BLOCK_N, DIM_PAD] each


@triton.jit  # type: ignore[misc]
def attend_tile(
    q,  # [ROWS, DIM_PAD]
    k,  # [BLOCK_N, DIM_PAD]
    v,  # [BLOCK_N, DIM_PAD]
    visible,  # [ROWS, BLOCK_N] or [1, BLOCK_N]: which keys each row attends to
    m_i,  # [ROWS] running maxima of the scaled scores (log2 domain)
    l_i,  # [ROWS] running sums of exp2(score - m_i)
    acc,  # [ROWS, DIM_PAD] running weighted sums of values
    scale_log2,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding); None: triton's default
    UPCAST_DOTS: tl.constexpr,  # see upcast_dots
):
    if UPCAST_DOTS:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [ROWS, BLOCK_N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
