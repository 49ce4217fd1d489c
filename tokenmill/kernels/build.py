"""Compiling the C kernels into the cache, without torch: the engine core starts a cold build in the
background (`build_in_background`) while it imports torch, and `cpu.load` then finds the library built.

One library per text of the sources, flags and compiler, in `$TOKENMILL_CACHE_DIR/kernels` (default
`~/.cache/tokenmill/kernels`); a compile takes about 3 s on two cores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
SOURCE = SOURCE_DIR / "kernels.c"  # includes every kernel source of this directory
# No contraction of a product and a sum into one FMA unless the source asks for it: a kernel that matches a
# torch expression bit for bit (layer_ops.c's rotary) must round each operation as torch does.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
# Where the CPU has AVX512-VNNI (with VL and BW), the GGUF block kernel multiplies bytes with it
# (block_linear.c; the same sums). 256-bit vectors stay the preferred width for everything else.
VNNI_FLAGS = ("-mavx512vnni", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=256")
VNNI_CPU_FLAGS = frozenset({"avx512_vnni", "avx512vl", "avx512bw"})
# Where it also has AMX-INT8, the block kernel's calls of many rows multiply on AMX tiles (block_amx.c).
AMX_FLAGS = ("-mamx-tile", "-mamx-int8")
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_int8"})
DISABLE_ENV = "TOKENMILL_CPU_KERNELS"
VNNI_ENV = "TOKENMILL_CPU_VNNI"
AMX_ENV = "TOKENMILL_CPU_AMX"
CPUINFO = Path("/proc/cpuinfo")

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("TOKENMILL_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tokenmill"
    )
    return Path(base) / "kernels"


@functools.cache  # asked a few times at start-up; /proc/cpuinfo is long on a many-core machine
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (x86 `flags`, aarch64 `Features`); empty elsewhere."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def compile_flags() -> tuple[str, ...]:
    """CFLAGS, with VNNI_FLAGS where this CPU has AVX512-VNNI, -VL and -BW, and then AMX_FLAGS where it
    has AMX-INT8 tiles too (`TOKENMILL_CPU_VNNI=0` leaves both out, `TOKENMILL_CPU_AMX=0` the tiles)."""
    if os.environ.get(VNNI_ENV, "1") == "0" or not cpu_flags() >= VNNI_CPU_FLAGS:
        return CFLAGS
    if os.environ.get(AMX_ENV, "1") == "0" or not cpu_flags() >= AMX_CPU_FLAGS:
        return CFLAGS + VNNI_FLAGS
    return CFLAGS + VNNI_FLAGS + AMX_FLAGS


def unavailable_reason() -> str | None:
    """Why the C kernels cannot run on this machine, or None when they can."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return "this CPU lacks AVX2, FMA or F16C"
    if find_compiler() is None:
        return "no C compiler found: install gcc (or set CC)"
    return None


def find_compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for name in candidates if (path := shutil.which(name))), None)


def library_path(source: Path, compiler: str) -> Path:
    """Where `source`'s library lives in the cache: keyed by every source and header beside it (a source
    may include the others, as kernels.c does), the flags and the compiler."""
    flags = " ".join((compiler, *compile_flags(), *LIBS))
    siblings = sorted(
        path for path in source.parent.iterdir() if path.suffix in (".c", ".h") and path != source
    )
    text = source.read_bytes() + b"".join(path.read_bytes() for path in siblings)
    key = hashlib.sha256(text + flags.encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, compiler: str) -> Path:
    """Compiles `source` into the cache unless it is there, and returns the library. A build of the same
    library under way in this process (the background one) is waited for, not repeated. The library is
    written under a temporary name and renamed, so a crash never leaves half a file."""
    library = library_path(source, compiler)
    with _locks_guard:
        lock = _locks.setdefault(library, threading.Lock())
    with lock:
        if library.exists():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            partial = Path(scratch) / library.name
            command = [compiler, *compile_flags(), str(source), "-o", str(partial), *LIBS]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
            os.replace(partial, library)
    return library


def build_in_background(source: Path = SOURCE) -> threading.Thread | None:
    """Starts building `source` on a thread where the kernels can run; None where they cannot. A failure
    is left to the foreground build, which retries and reports it."""
    if unavailable_reason() is not None:
        return None
    compiler = find_compiler() or "cc"

    def run() -> None:
        with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
            build(source, compiler)

    thread = threading.Thread(target=run, name="tokenmill-kernel-build", daemon=True)
    thread.start()
    return thread
