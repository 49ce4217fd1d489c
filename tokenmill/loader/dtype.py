"""The compute dtype: a name from the config (`auto` or an explicit dtype) resolved for a device."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# x86: AVX512-BF16 or AMX-BF16 compute bf16 natively; aarch64: the BF16 extension (e.g. Graviton 3).
# Without them torch emulates bf16 matmuls, which is slower than float32.
_NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_CPUINFO = Path("/proc/cpuinfo")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (x86 `flags`, aarch64 `Features`); empty elsewhere."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & _NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for `name` (auto | float32 | bfloat16 | float16) on `device`.

    auto: bfloat16 on GPUs that support it (float16 on older ones) and on CPUs with native bf16,
    else float32.
    """
    if name in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[name]
    if name != "auto":
        choices = ", ".join(["auto", *DTYPES_BY_NAME])
        raise ValueError(f"unknown dtype {name!r}: choose one of {choices}")
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32
