"""Building and calling the C kernels of this package on CPU.

The sources are compiled on first use with the system C compiler (`$CC`, else cc, gcc or clang) into
`$TOKENMILL_CACHE_DIR/kernels` (default `~/.cache/tokenmill/kernels`), one file per source, flags and
compiler, so later starts load it at once; a plain C file compiles in under a second or two. Where a kernel
cannot be used (not x86-64 with AVX2 and FMA, no compiler, `TOKENMILL_CPU_KERNELS=0`), its loader
(`int8_library()`, `attention_library()`) returns None, the reason is logged once, and callers take
their torch path instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # loaded first: the kernel links the libgomp torch has already loaded, so they share threads

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
INT8_SOURCE = SOURCE_DIR / "int8_linear.c"
ATTENTION_SOURCE = SOURCE_DIR / "paged_attention.c"
ACTIVATION_BLOCK = 32  # input features per activation scale; the kernel needs K to be a multiple of it
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
DISABLE_ENV = "TOKENMILL_CPU_KERNELS"


def cache_dir() -> Path:
    base = os.environ.get("TOKENMILL_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tokenmill"
    )
    return Path(base) / "kernels"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def unavailable_reason() -> str | None:
    """Why the C kernels cannot run on this machine, or None when they can."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not {"avx2", "fma"} <= cpu_flags():
        return "this CPU lacks AVX2 or FMA"
    if find_compiler() is None:
        return "no C compiler found: install gcc (or set CC)"
    return None


def find_compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for name in candidates if (path := shutil.which(name))), None)


def build(source: Path, compiler: str) -> Path:
    """Compiles `source` into the cache (once per source, flags and compiler) and returns the library.
    The library is written under a temporary name and renamed, so a crash never leaves half a file."""
    flags = " ".join((compiler, *CFLAGS, *LIBS))
    key = hashlib.sha256(source.read_bytes() + flags.encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        command = [compiler, *CFLAGS, str(source), "-o", str(partial), *LIBS]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


def load(source: Path, function: str, argtypes: list[type]) -> ctypes.CDLL | None:
    """`source` built and loaded with `function`'s signature set, or None where it cannot run (the reason
    is logged, with what the callers do instead)."""
    reason = unavailable_reason()
    if reason is None:
        try:
            library = ctypes.CDLL(str(build(source, find_compiler() or "cc")))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
            reason = f"building {source.name} failed: {error}"
    if reason is not None:
        logger.warning("CPU kernel %s unavailable (%s); using the torch path instead", source.stem, reason)
        return None
    entry = getattr(library, function)
    entry.argtypes = argtypes
    entry.restype = ctypes.c_int
    return library


_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def int8_library() -> ctypes.CDLL | None:
    """The int8 linear kernel (int8_linear.c), or None where it cannot run (the reason is logged once)."""
    return load(INT8_SOURCE, "tm_int8_linear", [*[_POINTER] * 5, _SIZE, _SIZE, _SIZE])


@functools.cache
def attention_library() -> ctypes.CDLL | None:
    """The paged decode-attention kernel (paged_attention.c), or None where it cannot run."""
    signature = [_POINTER, _SIZE, _POINTER, _POINTER, _POINTER, _SIZE, _POINTER, _POINTER]
    return load(ATTENTION_SOURCE, "tm_paged_decode_attention", [*signature, *[_SIZE] * 5, ctypes.c_float])


def int8_linear(
    library: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`x` [M, K] float32 times the int8 `weight` [N, K] with float32 channel `scales` [N], plus float32
    `bias` [N]: [M, N] float32. The kernel quantizes `x` per row in blocks of 32 features."""
    x = x.contiguous()
    (num_rows, features), num_outputs = x.shape, weight.shape[0]
    out = torch.empty(num_rows, num_outputs, dtype=torch.float32)
    status = library.tm_int8_linear(
        x.data_ptr(),
        weight.data_ptr(),
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        num_rows,
        num_outputs,
        features,
    )
    if status != 0:
        raise MemoryError(f"int8 kernel could not allocate scratch for {num_rows} x {features} activations")
    return out


def paged_decode_attention(
    library: ctypes.CDLL,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (`query` [B, H, D] float32; its rows may be strided, its heads must be
    contiguous) over the paged `kv_cache` [2, num_blocks, block_size, KV, D] float32, with `block_tables`
    [B, max_blocks] and `seq_lens` [B] int64 (contiguous): [B, H, D] float32."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert query.stride(2) == 1 and query.stride(1) == head_dim and head_dim % 8 == 0
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32)
    status = library.tm_paged_decode_attention(
        query.data_ptr(),
        query.stride(0),
        kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(),
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
    )
    if status != 0:
        raise MemoryError("paged attention kernel could not allocate its scores")
    return out
