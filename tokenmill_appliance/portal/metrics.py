"""Machine and engine figures for the Metrics tab: CPU, RAM, disk, GPU and the engine's /metrics.

A sampler keeps a short history so the charts have something to draw the moment the tab opens.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

logger = logging.getLogger(__name__)

HISTORY_POINTS = 150
SAMPLE_INTERVAL_S = 2.0
# The engine's Prometheus names (vLLM's, which tokenmill's server keeps), first match wins.
ENGINE_GAUGES = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prefix_hit_rate": ("tokenmill:prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate"),
}
ENGINE_COUNTERS = {
    "generation_tokens": ("vllm:generation_tokens_total",),
    "prefix_hits": ("vllm:prefix_cache_hits_total",),
    "prefix_queries": ("vllm:prefix_cache_queries_total",),
}


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each metric's samples over its labels: `name{a="b"} 1.5` -> {"name": 1.5}."""
    values: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rsplit("}", 1)[-1]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        if not math.isnan(value):
            values[name.strip()] += value
    return dict(values)


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((values[n] for n in names if n in values), None)


@dataclass(frozen=True)
class Sample:
    """One point of the Metrics tab's charts; None where a figure is not available."""

    time: float
    cpu_percent: float
    ram_percent: float
    ram_used_bytes: int
    disk_percent: float
    gpu_percent: float | None = None
    gpu_memory_percent: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    tokens_per_s: float | None = None
    kv_cache_usage: float | None = None
    prefix_hit_rate: float | None = None


async def gpu_figures() -> tuple[float, float] | None:
    """(utilisation %, memory %) averaged over GPUs from nvidia-smi, or None without one."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    query = "--query-gpu=utilization.gpu,memory.used,memory.total"
    try:
        process = await asyncio.create_subprocess_exec(
            binary, query, "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 5)
    except (TimeoutError, OSError):
        return None
    return parse_nvidia_smi(out.decode("utf-8", "replace"))


def parse_nvidia_smi(text: str) -> tuple[float, float] | None:
    """`util, mem_used, mem_total` CSV rows (one per GPU) -> (mean utilisation %, mean memory %)."""
    try:
        rows = [[float(x) for x in line.split(",")] for line in text.splitlines() if line.strip()]
    except ValueError:
        return None
    if not rows or any(len(r) != 3 for r in rows):
        return None
    util = sum(r[0] for r in rows) / len(rows)
    memory = sum(100 * r[1] / r[2] for r in rows if r[2]) / len(rows)
    return util, memory


class MetricsSampler:
    """Samples the machine and the engine every few seconds and keeps the last HISTORY_POINTS."""

    def __init__(
        self, disk_path: Path, engine_metrics_url: str | None, session: aiohttp.ClientSession
    ) -> None:
        self.disk_path = disk_path
        self.engine_metrics_url = engine_metrics_url
        self.session = session
        self.history: collections.deque[Sample] = collections.deque(maxlen=HISTORY_POINTS)
        self._last_counters: tuple[float, dict[str, float]] | None = None

    async def engine_figures(self) -> dict[str, float | None]:
        if self.engine_metrics_url is None:
            return {}
        try:
            timeout = aiohttp.ClientTimeout(total=3)
            async with self.session.get(self.engine_metrics_url, timeout=timeout) as response:
                if response.status != 200:
                    return {}
                values = parse_prometheus(await response.text())
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return {}
        figures: dict[str, float | None] = {k: _first(values, names) for k, names in ENGINE_GAUGES.items()}
        counters = {k: v for k, names in ENGINE_COUNTERS.items() if (v := _first(values, names)) is not None}
        now = time.monotonic()
        if self._last_counters is not None and "generation_tokens" in counters:
            then, previous = self._last_counters
            delta = counters["generation_tokens"] - previous.get("generation_tokens", 0.0)
            figures["tokens_per_s"] = max(0.0, delta / max(now - then, 1e-6))
        if figures["prefix_hit_rate"] is None and counters.get("prefix_queries"):
            figures["prefix_hit_rate"] = counters.get("prefix_hits", 0.0) / counters["prefix_queries"]
        self._last_counters = (now, counters)
        return figures

    async def sample(self) -> Sample:
        memory = psutil.virtual_memory()
        try:
            disk_percent = psutil.disk_usage(str(self.disk_path)).percent
        except OSError:
            disk_percent = 0.0
        gpu = await gpu_figures()
        engine = await self.engine_figures()
        point = Sample(
            time=time.time(),
            cpu_percent=psutil.cpu_percent(interval=None),
            ram_percent=memory.percent,
            ram_used_bytes=memory.used,
            disk_percent=disk_percent,
            gpu_percent=gpu[0] if gpu else None,
            gpu_memory_percent=gpu[1] if gpu else None,
            **engine,
        )
        self.history.append(point)
        return point

    def snapshot(self) -> dict[str, Any]:
        return {"interval_s": SAMPLE_INTERVAL_S, "history": [asdict(p) for p in self.history]}

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # a failed sample must not end the sampler
                logger.warning("metrics sample failed: %s", exc)
            await asyncio.sleep(SAMPLE_INTERVAL_S)
