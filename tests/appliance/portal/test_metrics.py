"""Parsing the engine's Prometheus text and turning counters into rates."""

import shutil
from pathlib import Path

import aiohttp
import pytest

from tokenmill_appliance.portal.metrics import MetricsSampler, gpu_figures, parse_nvidia_smi, parse_prometheus

from .conftest import Upstream


def test_parse_prometheus_sums_labels_and_skips_comments() -> None:
    text = (
        "# HELP vllm:num_requests_running Requests.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a"} 2.0\n'
        'vllm:num_requests_running{model_name="b",x="}"} 1.0\n'
        "vllm:generation_tokens_total 1.5e3\n"
        "bad_line\n"
        "nan_metric NaN\n"
    )
    assert parse_prometheus(text) == {
        "vllm:num_requests_running": 3.0,
        "vllm:generation_tokens_total": 1500.0,
    }


@pytest.mark.slow
@pytest.mark.asyncio
async def test_engine_figures_from_a_live_metrics_endpoint(upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as session:
        sampler = MetricsSampler(Path("/"), f"http://127.0.0.1:{upstream.port}/metrics", session)
        first = await sampler.engine_figures()
        assert first["requests_running"] == 3 and first["kv_cache_usage"] == 0.25
        assert first["prefix_hit_rate"] == 0.25 and "tokens_per_s" not in first
        second = await sampler.engine_figures()
        assert second["tokens_per_s"] == 0.0
        point = await sampler.sample()
        assert point.requests_waiting == 1 and len(sampler.history) == 1


@pytest.mark.asyncio
async def test_engine_down_gives_no_engine_figures() -> None:
    async with aiohttp.ClientSession() as session:
        sampler = MetricsSampler(Path("/"), "http://127.0.0.1:9/metrics", session)
        assert await sampler.engine_figures() == {}
        assert (await sampler.sample()).requests_running is None


def test_parse_nvidia_smi() -> None:
    # The first row is what an idle H200 printed for the query gpu_figures() makes.
    assert parse_nvidia_smi("0, 0, 143771\n") == (0.0, 0.0)
    assert parse_nvidia_smi("50, 40, 80\n100, 80, 80\n") == (75.0, 75.0)
    assert parse_nvidia_smi("[N/A], 0, 1\n") is None
    assert parse_nvidia_smi("") is None


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_gpu_figures_from_nvidia_smi() -> None:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi on this machine")
    figures = await gpu_figures()
    assert figures is not None
    utilisation, memory = figures
    assert 0 <= utilisation <= 100 and 0 <= memory <= 100
