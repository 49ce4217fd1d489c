"""How many KV cache blocks fit: from an explicit size, free RAM (CPU) or a profiled GPU budget."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.config import CacheConfig

logger = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    """What a GPU holds besides the KV cache: the weights, and the peak one step adds on top of them."""

    weight_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_budget(cache: CacheConfig, device: torch.device, profile: MemoryProfile | None = None) -> int:
    """Bytes the KV cache may take: `--kv-cache-memory` as given, else on a GPU its utilization share
    less the profiled weights and peak activations (`profile`), else a share of free RAM."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device.type == "cuda":
        assert profile is not None, "GPU sizing needs a profiled peak"
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(cache.gpu_memory_utilization * total) - profile.peak_bytes
        logger.info(
            "GPU memory: %.2f GiB x %.2f utilization - %.2f GiB weights - %.2f GiB peak activations = "
            "%.2f GiB KV cache",
            total / GiB,
            cache.gpu_memory_utilization,
            profile.weight_bytes / GiB,
            profile.activation_bytes / GiB,
            budget / GiB,
        )
        return max(budget, 0)
    return min(int(cache.cpu_kv_cache_fraction * available_ram_bytes()), cache.max_cpu_kv_cache)


def check_explicit_kv_cache_fits(cache_bytes: int, device: torch.device) -> None:
    """A `--kv-cache-memory` larger than what the GPU has free (after the weights) is refused by name,
    not left to fail as an out-of-memory error in the allocation."""
    free, _ = torch.cuda.mem_get_info(device)
    if cache_bytes > free:
        raise ValueError(
            f"--kv-cache-memory asks for {cache_bytes / GiB:.2f} GiB but the GPU has {free / GiB:.2f} GiB "
            "free after the weights: give a smaller size, or leave it out to size the cache by "
            "--gpu-memory-utilization"
        )
