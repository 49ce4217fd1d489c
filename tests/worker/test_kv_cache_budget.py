"""KV cache sizing: an explicit size, a share of free RAM on CPU, or the profiled GPU budget."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tokenmill import LLM
from tokenmill.config import CacheConfig
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.worker.memory import (
    GiB,
    MemoryProfile,
    available_ram_bytes,
    check_explicit_kv_cache_fits,
    kv_cache_budget,
)

CUDA = torch.device("cuda", 0)


@pytest.fixture
def an_80_gib_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's answer for an 80 GiB card (the budget reads nothing else from the device)."""
    properties = SimpleNamespace(total_memory=80 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)


def test_an_explicit_size_wins_everywhere() -> None:
    cache = CacheConfig(kv_cache_memory=3 << 30)
    assert kv_cache_budget(cache, torch.device("cpu")) == 3 << 30
    assert kv_cache_budget(cache, CUDA, MemoryProfile(60 * GiB, 40 * GiB)) == 3 << 30


def test_the_gpu_budget_is_its_utilization_share_less_the_profiled_peak_and_is_printed(
    an_80_gib_gpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CacheConfig(gpu_memory_utilization=0.9)
    with caplog.at_level(logging.INFO, logger="tokenmill.worker.memory"):
        budget = kv_cache_budget(cache, CUDA, MemoryProfile(15 * GiB, 2 * GiB))
    assert budget == int(0.9 * 80 * GiB) - 17 * GiB
    expected = "80.00 GiB x 0.90 utilization - 15.00 GiB weights - 2.00 GiB peak activations = 55.00 GiB"
    assert expected in caplog.text


def test_a_peak_beyond_the_share_leaves_no_kv_cache(an_80_gib_gpu: None) -> None:
    # The engine then refuses to start, naming both numbers (engine/core.py).
    profile = MemoryProfile(45 * GiB, 5 * GiB)
    assert kv_cache_budget(CacheConfig(gpu_memory_utilization=0.5), CUDA, profile) == 0


def test_the_cpu_budget_is_a_share_of_available_ram_with_a_cap() -> None:
    cpu = torch.device("cpu")
    share = CacheConfig(cpu_kv_cache_fraction=0.01, max_cpu_kv_cache=1 << 50)
    assert kv_cache_budget(share, cpu) == pytest.approx(0.01 * available_ram_bytes(), rel=0.05)
    assert kv_cache_budget(CacheConfig(cpu_kv_cache_fraction=0.5, max_cpu_kv_cache=1 << 20), cpu) == 1 << 20


def test_an_explicit_size_past_the_free_gpu_memory_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB, 80 * GiB))
    check_explicit_kv_cache_fits(9 * GiB, CUDA)
    with pytest.raises(ValueError, match="asks for 12.00 GiB but the GPU has 10.00 GiB free"):
        check_explicit_kv_cache_fits(12 * GiB, CUDA)


def test_the_largest_step_samples_max_num_seqs_rows_on_the_costliest_path(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peak a GPU keeps free must include sampling a full batch (a decode step's logits, top-p's sort
    # over the vocabulary, logprobs), not only the forward of a full token budget: run on CPU, where
    # the same step runs without the GPU's memory counters.
    llm = LLM(str(tiny_model_dir("qwen3")), dtype="float32", max_model_len=64, kv_cache_memory=2 << 20,
              max_num_seqs=40, max_num_batched_tokens=256)  # fmt: skip
    runner = llm.engine.core.runner
    sampled: list[tuple[int, SamplingMetadata]] = []
    sample = runner.sampler.__call__

    def recording_sampler(logits: torch.Tensor, metadata: SamplingMetadata) -> object:
        sampled.append((logits.shape[0], metadata))
        return sample(logits, metadata)

    monkeypatch.setattr(runner, "sampler", recording_sampler)
    cache_bytes = runner.run_largest_step(64)
    ((num_rows, metadata),) = sampled
    assert num_rows == 40  # the batch's rows, not the 4 sequences of the 256-token prompt step
    assert metadata.top_p is not None and metadata.penalties is not None and metadata.max_num_logprobs == 20
    assert cache_bytes == 256 // runner.block_size * runner.kv_bytes_per_block()
