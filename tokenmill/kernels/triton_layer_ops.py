"""Triton kernels for a decoder layer's small ops in half precision: residual add + RMSNorm, SiLU-and-mul
and rotary embedding, one launch each.

In eager torch these are about 25 kernels per layer (RMSNorm alone is eight: upcast, square, mean,
add, rsqrt, multiply, downcast, weight), and at batch 1 each costs a few microseconds of GPU time even
replayed from a CUDA graph: on an 8B model, hundreds per step. Each kernel rounds to the model's dtype
wherever the torch expression it replaces does, so results agree with the eager layers (up to the order of
RMSNorm's sum of squares and the exponential's last bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.attention.triton_tiles import FP_FUSION


@triton.jit  # type: ignore[misc]
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, num_heads, hidden]: rows strided, features contiguous
    residual_ptr,  # [num_tokens, hidden] contiguous (HAS_RESIDUAL only)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens * num_heads, hidden] contiguous
    summed_ptr,  # [num_tokens, hidden] contiguous: x + residual (HAS_RESIDUAL only)
    stride_xt,
    stride_xh,
    num_heads,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token, head = row // num_heads, row % num_heads
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + token * stride_xt + head * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # num_heads is 1: row == token
        residual = tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded as torch's add
        tl.store(summed_ptr + row * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inverse_rms).to(x.dtype)  # the reference rounds before the weight multiplies
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * weight.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * hidden + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of `x` [..., D] over its last dimension (of `x + residual` when a residual is given; the
    sum is returned too). `x` may be [tokens, D] or [tokens, heads, D] with strided rows; a residual is
    [tokens, D]."""
    shape, hidden = x.shape, x.shape[-1]
    if x.stride(-1) != 1 or x.dim() not in (2, 3):
        x = x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None
    if residual is not None:
        if x.dim() != 2:
            raise ValueError("a residual needs x as [tokens, hidden]")
        residual = residual.reshape(x.shape).contiguous()
        summed = torch.empty_like(out)
    num_tokens = x.shape[0]
    if num_tokens:
        _launch_rms_norm(x, residual, weight, eps, out, summed)
    return out.view(shape), None if summed is None else summed.view(shape)


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    summed: torch.Tensor | None,
) -> None:
    num_heads, hidden = (x.shape[1], x.shape[2]) if x.dim() == 3 else (1, x.shape[1])
    _rms_norm_kernel[(x.shape[0] * num_heads,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        summed if summed is not None else out,
        x.stride(0),
        x.stride(1) if x.dim() == 3 else 0,
        num_heads,
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=_num_warps(hidden),
        enable_fp_fusion=FP_FUSION,
    )


@triton.jit  # type: ignore[misc]
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * width]: [gate | up], rows strided
    out_ptr,  # [num_tokens, width] contiguous
    stride_xt,
    width,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + token * stride_xt + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + token * stride_xt + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu's formula, rounded as it is
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + token * width + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x` [..., 2D] laid out [gate | up]: [..., D]."""
    shape = x.shape
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, shape[-1])
    num_tokens, width = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, width, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(width))
    if num_tokens:
        grid = (num_tokens, triton.cdiv(width, block))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), width, BLOCK=block, enable_fp_fusion=FP_FUSION)
    return out.view(*shape[:-1], width)


@triton.jit  # type: ignore[misc]
def _rotary_kernel(
    x_ptr,  # [num_tokens, num_heads, head_dim]: tokens and heads strided, dims contiguous
    cos_ptr,  # [num_tokens, head_dim] contiguous
    sin_ptr,
    out_ptr,  # [num_tokens, num_heads, head_dim] contiguous
    stride_xt,
    stride_xh,
    num_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, HALF_PAD)
    mask = cols < HALF
    src = x_ptr + token * stride_xt + head * stride_xh
    x1 = tl.load(src + cols, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + cols, mask=mask, other=0.0)
    table = token * 2 * HALF
    cos1 = tl.load(cos_ptr + table + cols, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table + cols, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x1.dtype
    a1, b1 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product rounded to the dtype before the sum, as in torch.
    first = (a1 * cos1).to(dtype).to(tl.float32) + (-(b1 * sin1)).to(dtype).to(tl.float32)
    second = (b1 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)
    dst = out_ptr + (token * num_heads + head) * 2 * HALF
    tl.store(dst + cols, first.to(dtype), mask=mask)
    tl.store(dst + HALF + cols, second.to(dtype), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` [tokens, heads, D] (rows may be strided, dims contiguous) rotated by `cos` and `sin`
    [tokens, 1, D]: a new [tokens, heads, D] tensor, `x * cos + rotate_half(x) * sin`."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=x.dtype, device=x.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens, num_heads)](
            x,
            cos.contiguous(),
            sin.contiguous(),
            out,
            x.stride(0),
            x.stride(1),
            num_heads,
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            num_warps=1,
            enable_fp_fusion=FP_FUSION,
        )
    return out


def _num_warps(width: int) -> int:
    return min(16, max(1, triton.next_power_of_2(width) // 512))
