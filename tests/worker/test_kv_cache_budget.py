"""KV cache sizing: an explicit size, a share of free RAM on CPU, or the profiled GPU budget."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tokenmill.config import CacheConfig
from tokenmill.worker.memory import GiB, available_ram_bytes, kv_cache_budget

CUDA = torch.device("cuda", 0)


@pytest.fixture
def an_80_gib_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's answer for an 80 GiB card (the budget reads nothing else from the device)."""
    properties = SimpleNamespace(total_memory=80 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)


def test_an_explicit_size_wins_everywhere() -> None:
    cache = CacheConfig(kv_cache_memory=3 << 30)
    assert kv_cache_budget(cache, torch.device("cpu")) == 3 << 30
    assert kv_cache_budget(cache, CUDA, peak_bytes=100 * GiB) == 3 << 30


def test_the_gpu_budget_is_its_utilization_share_less_the_profiled_peak_and_is_printed(
    an_80_gib_gpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CacheConfig(gpu_memory_utilization=0.9)
    with caplog.at_level(logging.INFO, logger="tokenmill.worker.memory"):
        budget = kv_cache_budget(cache, CUDA, peak_bytes=17 * GiB)
    assert budget == int(0.9 * 80 * GiB) - 17 * GiB
    assert "80.00 GiB x 0.90 utilization - 17.00 GiB weights and activations = 55.00 GiB" in caplog.text


def test_a_peak_beyond_the_share_leaves_no_kv_cache(an_80_gib_gpu: None) -> None:
    # The engine then refuses to start, naming both numbers (engine/core.py).
    assert kv_cache_budget(CacheConfig(gpu_memory_utilization=0.5), CUDA, peak_bytes=50 * GiB) == 0


def test_the_cpu_budget_is_a_share_of_available_ram_with_a_cap() -> None:
    cpu = torch.device("cpu")
    share = CacheConfig(cpu_kv_cache_fraction=0.01, max_cpu_kv_cache=1 << 50)
    assert kv_cache_budget(share, cpu) == pytest.approx(0.01 * available_ram_bytes(), rel=0.05)
    assert kv_cache_budget(CacheConfig(cpu_kv_cache_fraction=0.5, max_cpu_kv_cache=1 << 20), cpu) == 1 << 20
