"""Building and calling the C kernels of this package on CPU.

The kernels (kernels.c and the sources it includes) are compiled on first use with the system C compiler
(`$CC`, else cc, gcc or clang) into `$TOKENMILL_CACHE_DIR/kernels` (build.py, which needs no torch), so
later starts load them at once. Where they cannot be used (not x86-64 with AVX2, FMA and F16C, no compiler,
`TOKENMILL_CPU_KERNELS=0`), `kernel_library()` returns None, the reason is logged once, and callers take
their torch path instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

import torch  # loaded first: the kernel links the libgomp torch has already loaded, so they share threads

from tokenmill.kernels.build import (  # noqa: F401  (re-exported: the kernels' one module for callers)
    DISABLE_ENV,
    SOURCE,
    SOURCE_DIR,
    build,
    cpu_flags,
    find_compiler,
    unavailable_reason,
)

logger = logging.getLogger(__name__)

ACTIVATION_BLOCK = 32  # input features per activation scale; the kernel needs K to be a multiple of it


Signature = tuple[list[Any], Any]  # a C function's argument types and result type (ctypes types)


def load(source: Path, functions: dict[str, Signature]) -> ctypes.CDLL | None:
    """`source` built and loaded with its `functions`' signatures set, or None where it cannot run (the
    reason is logged, with what the callers do instead)."""
    reason = unavailable_reason()
    if reason is None:
        try:
            library = ctypes.CDLL(str(build(source, find_compiler() or "cc")))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
            reason = f"building {source.name} failed: {error}"
    if reason is not None:
        logger.warning("CPU kernels (%s) unavailable (%s); using the torch path instead", source.name, reason)
        return None
    for name, (argtypes, restype) in functions.items():
        entry = getattr(library, name)
        entry.argtypes, entry.restype = argtypes, restype
    return library


_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
SIGNATURES: dict[str, Signature] = {
    "tm_int8_linear": ([*[_POINTER] * 5, _SIZE, _SIZE, _SIZE], ctypes.c_int),
    "tm_block_linear": ([_POINTER, _POINTER, _SIZE, _POINTER, _POINTER, _SIZE, _SIZE, _SIZE], ctypes.c_int),
    "tm_block_group_bytes": ([_SIZE, _SIZE], ctypes.c_int64),
    "tm_paged_decode_attention": (
        # query, its stride, k/v cache, tables, their stride, lengths, out, B, H, KV, D, block size, scale,
        # then the step's keys, their stride, values, their stride, slots
        [_POINTER, _SIZE, *[_POINTER] * 3, _SIZE, *[_POINTER] * 2, *[_SIZE] * 5, ctypes.c_float]
        + [_POINTER, _SIZE, _POINTER, _SIZE, _POINTER, ctypes.c_int],  # ..., KV_FORMATS[cache dtype]
        ctypes.c_int,
    ),
    # query, its row stride, keys, their row stride, values, their row stride, out, L, S, H, KV, D, scale
    "tm_prefill_attention": (
        [_POINTER, _SIZE, _POINTER, _SIZE, _POINTER, _SIZE, _POINTER, *[_SIZE] * 5, ctypes.c_float],
        ctypes.c_int,
    ),
    # query, its row stride, k/v cache, the sequence's block table, block size, out, L, S, H, KV, D, scale,
    # KV_FORMATS[cache dtype]
    "tm_prefill_attention_paged": (
        [
            _POINTER,
            _SIZE,
            _POINTER,
            _POINTER,
            _POINTER,
            _SIZE,
            _POINTER,
            *[_SIZE] * 5,
            ctypes.c_float,
            ctypes.c_int,
        ],
        ctypes.c_int,
    ),
    "tm_write_kv_cache": (
        [_POINTER, _SIZE, _POINTER, _SIZE, *[_POINTER] * 3, _SIZE, _SIZE, ctypes.c_int],
        None,
    ),
    "tm_rms_norm": ([*[_POINTER] * 5, _SIZE, _SIZE, ctypes.c_float], None),
    "tm_rotary": ([_POINTER, _SIZE, *[_POINTER] * 3, *[_SIZE] * 3], None),
    "tm_silu_and_mul": ([_POINTER, _POINTER, _SIZE, _SIZE], None),
    "tm_argmax_rows": ([_POINTER, _SIZE, _POINTER, _SIZE, _SIZE], None),
    "tm_decode_layer": ([*[_POINTER] * 4, ctypes.c_int], ctypes.c_int),  # structures: kernels/decode_layer.py
    "tm_decode_layer_workspace": ([_POINTER], ctypes.c_int64),
}


@functools.cache
def kernel_library() -> ctypes.CDLL | None:
    """Every kernel (kernels.c), or None where they cannot run (the reason is logged once)."""
    return load(SOURCE, SIGNATURES)


def int8_linear(
    library: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`x` [M, K] float32 times the int8 `weight` [N, K] with float32 channel `scales` [N], plus float32
    `bias` [N]: [M, N] float32. The kernel quantizes `x` per row in blocks of 32 features."""
    weights = (weight.data_ptr(), scales.data_ptr())
    return _linear(library.tm_int8_linear, "int8", x.contiguous(), weights, bias, weight.shape[0])


def _linear(
    kernel: Any,
    name: str,
    x: torch.Tensor,
    weights: tuple[int, ...],
    bias: torch.Tensor | None,
    num_outputs: int,
) -> torch.Tensor:
    """Calls a linear kernel taking (x, *weights, bias, out, M, N, K): `x` [M, K] contiguous float32 in,
    [M, num_outputs] float32 out."""
    num_rows, features = x.shape
    out = torch.empty(num_rows, num_outputs, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.data_ptr()
    status = kernel(x.data_ptr(), *weights, bias_ptr, out.data_ptr(), num_rows, num_outputs, features)
    if status != 0:
        raise MemoryError(f"{name} kernel could not allocate scratch for {num_rows} x {features} activations")
    return out


# Weight layouts of `tm_block_linear` (block_linear.c), GGUF's block types rearranged (model/gguf_linear.py).
BLOCK_FORMATS = {"Q4_1": 1, "Q8_0": 2}


def block_linear(
    library: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    block_format: str,
    num_outputs: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`x` [M, K] float32 times the weight of `num_outputs` rows that `weight` [ceil(num_outputs / 8), group
    bytes] uint8 holds in `block_format` (packed as block_linear.c describes), plus float32 `bias`
    [num_outputs]: [M, num_outputs] float32. The kernel quantizes `x` per row in blocks of 32 features."""
    x = x.contiguous()
    num_rows, features = x.shape
    code = BLOCK_FORMATS[block_format]
    assert weight.is_contiguous() and weight.shape[0] == -(-num_outputs // 8)
    assert weight.shape[1] == library.tm_block_group_bytes(code, features)
    return _linear(library.tm_block_linear, "block", x, (weight.data_ptr(), code), bias, num_outputs)


def argmax_rows(library: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index of `x` [M, D] float32 (rows may be strided), NaN counting as the
    greatest: [M] int64, torch.argmax's answer."""
    assert x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library.tm_argmax_rows(x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0], x.shape[1])
    return out


def heads_contiguous(x: torch.Tensor) -> bool:
    """Whether `x` [N, heads, head_dim] has each row's heads back to back (rows may be strided)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


# The element types the decode kernel reads and writes in the cache, as paged_attention.c numbers them.
KV_FORMATS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cache_halves(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the keys and the values of `kv_cache` [2, ...] (no views made: this runs per layer)."""
    base = kv_cache.data_ptr()
    return base, base + kv_cache.stride(0) * kv_cache.element_size()


def write_kv_cache(
    library: ctypes.CDLL, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """`key` and `value` [N, KV, D] float32 (heads contiguous) into `kv_cache` [2, num_blocks, block_size,
    KV, D] (a KV_FORMATS dtype) at `slots` [N] int64 (contiguous)."""
    assert heads_contiguous(key) and heads_contiguous(value) and slots.is_contiguous()
    keys, values = cache_halves(kv_cache)
    num_tokens, row = key.shape[0], key.shape[1] * key.shape[2]
    library.tm_write_kv_cache(
        key.data_ptr(),
        key.stride(0),
        value.data_ptr(),
        value.stride(0),
        keys,
        values,
        slots.data_ptr(),
        num_tokens,
        row,
        KV_FORMATS[kv_cache.dtype],
    )


NewKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a step's keys, values and their slots


def paged_decode_attention(
    library: ctypes.CDLL,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    new_kv: NewKV | None = None,
) -> torch.Tensor:
    """One query token per sequence (`query` [B, H, D] float32; its rows may be strided, its heads must be
    contiguous) over the paged `kv_cache` [2, num_blocks, block_size, KV, D] (a KV_FORMATS dtype), with
    `block_tables` [B, max_blocks] and `seq_lens` [B] int64 (contiguous): [B, H, D] float32. With `new_kv`
    (key and value [B, KV, D] laid out like `query`, slots [B] int64), the step's keys and values are
    written first."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert heads_contiguous(query) and head_dim % 8 == 0
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32)
    key, value, slots = new_kv if new_kv is not None else (None, None, None)
    status = library.tm_paged_decode_attention(
        query.data_ptr(),
        query.stride(0),
        *cache_halves(kv_cache),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        None if key is None else key.data_ptr(),
        0 if key is None else key.stride(0),
        None if value is None else value.data_ptr(),
        0 if value is None else value.stride(0),
        None if slots is None else slots.data_ptr(),
        KV_FORMATS[kv_cache.dtype],
    )
    if status != 0:
        raise MemoryError("paged attention kernel could not allocate its scores")
    return out


def prefill_attention(
    library: ctypes.CDLL, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of `query` [L, H, D] over `key` and `value` [S, KV, D] (all float32, rows may be
    strided, heads contiguous; S >= L): the queries are positions S - L .. S - 1. Returns [L, H, D]. The
    engine reads the cache in place (`prefill_attention_paged`); the tests compare that against this."""
    num_queries, num_heads, head_dim = query.shape
    assert heads_contiguous(query) and heads_contiguous(key) and heads_contiguous(value) and head_dim % 8 == 0
    out = torch.empty(num_queries, num_heads, head_dim, dtype=torch.float32)
    status = library.tm_prefill_attention(
        query.data_ptr(),
        query.stride(0),
        key.data_ptr(),
        key.stride(0),
        value.data_ptr(),
        value.stride(0),
        out.data_ptr(),
        num_queries,
        key.shape[0],
        num_heads,
        key.shape[1],
        head_dim,
        scale,
    )
    if status != 0:
        raise MemoryError("prefill attention kernel could not allocate its scratch memory")
    return out


def prefill_attention_paged(
    library: ctypes.CDLL,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Causal attention of `query` [L, H, D] float32 (rows may be strided, heads contiguous) over the first
    `seq_len` (>= L) cached keys and values of the sequence whose blocks `block_table` [>= ceil(seq_len /
    block_size)] int64 lists, in `kv_cache` [2, num_blocks, block_size, KV, D] (a KV_FORMATS dtype): the
    queries are positions seq_len - L .. seq_len - 1. Written into `out` [L, H, D] float32 (contiguous)."""
    num_queries, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert (
        heads_contiguous(query) and head_dim % 8 == 0 and out.is_contiguous() and block_table.is_contiguous()
    )
    status = library.tm_prefill_attention_paged(
        query.data_ptr(),
        query.stride(0),
        *cache_halves(kv_cache),
        block_table.data_ptr(),
        block_size,
        out.data_ptr(),
        num_queries,
        seq_len,
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
        KV_FORMATS[kv_cache.dtype],
    )
    if status != 0:
        raise MemoryError("prefill attention kernel could not allocate its scratch memory")


def rms_norm(
    library: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of `x` [..., D] float32 (of `x + residual` when a residual is given, which is returned too);
    D a multiple of 8."""
    x = x.contiguous()
    out = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(x)
    library.tm_rms_norm(
        x.data_ptr(),
        None if residual is None else residual.contiguous().data_ptr(),
        None if summed is None else summed.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.numel() // x.shape[-1],
        x.shape[-1],
        eps,
    )
    return out, summed


def rotary(library: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` [M, H, D] float32 (rows may be strided, heads contiguous) rotated by `cos` and `sin` [M, 1, D]
    (contiguous): a new [M, H, D] tensor, bit for bit `x * cos + rotate_half(x) * sin`."""
    num_rows, num_heads, head_dim = x.shape
    assert heads_contiguous(x) and cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty(num_rows, num_heads, head_dim, dtype=torch.float32)
    library.tm_rotary(
        x.data_ptr(),
        x.stride(0),
        out.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        num_rows,
        num_heads,
        head_dim,
    )
    return out


def silu_and_mul(library: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x` [M, 2D] float32 laid out [gate | up]: [M, D]."""
    x = x.contiguous()
    num_rows, width = x.numel() // x.shape[-1], x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], width, dtype=torch.float32)
    library.tm_silu_and_mul(x.data_ptr(), out.data_ptr(), num_rows, width)
    return out
