"""How many KV cache blocks fit: from an explicit size, free RAM (CPU) or a profiled GPU budget."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tokenmill.config import CacheConfig

logger = logging.getLogger(__name__)
GiB = 1 << 30


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_budget(cache: CacheConfig, device: torch.device, peak_bytes: int | None = None) -> int:
    """Bytes the KV cache may take. `peak_bytes`: profiled peak of weights + activations (GPU only)."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device.type == "cuda":
        assert peak_bytes is not None, "GPU sizing needs a profiled peak"
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(cache.gpu_memory_utilization * total) - peak_bytes
        logger.info(
            "GPU memory: %.2f GiB x %.2f utilization - %.2f GiB weights and activations = %.2f GiB KV cache",
            total / GiB,
            cache.gpu_memory_utilization,
            peak_bytes / GiB,
            budget / GiB,
        )
        return max(budget, 0)
    return min(int(cache.cpu_kv_cache_fraction * available_ram_bytes()), cache.max_cpu_kv_cache)
