"""Prometheus metrics with vLLM's names (so existing vLLM dashboards work), plus tokenmill's own.

Scheduler and KV cache gauges and the cumulative token counters are read from the latest
`SchedulerStats` at scrape time; latency histograms are observed as sequences finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.async_llm import RequestTiming
from tokenmill.metrics.stats import SchedulerStats

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class SchedulerCollector(Collector):
    """Gauges and counters taken from the engine's latest SchedulerStats at each scrape."""

    def __init__(self, model_name: str, get_stats: Callable[[], SchedulerStats]) -> None:
        self.model_name = model_name
        self.get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.get_stats()
        gauges = (
            ("vllm:num_requests_running", "Requests in the running batch.", stats.num_running_reqs),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting_reqs),
            ("vllm:kv_cache_usage_perc", "KV cache usage (1 means 100 percent).", stats.kv_cache_usage),
            ("tokenmill:num_free_blocks", "Free KV cache blocks.", stats.num_free_blocks),
            ("tokenmill:num_total_blocks", "KV cache blocks in the pool.", stats.num_total_blocks),
            ("tokenmill:prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens.", _hit_rate(stats)),
        )
        for name, doc, value in gauges:
            yield self._metric(GaugeMetricFamily(name, doc, labels=["model_name"]), value)
        counters = (
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats.num_prompt_tokens),
            ("vllm:generation_tokens", "Tokens generated.", stats.num_generation_tokens),
            ("vllm:num_preemptions", "Requests preempted.", stats.num_preemptions),
        )
        for name, doc, value in counters:
            yield self._metric(CounterMetricFamily(name, doc, labels=["model_name"]), value)

    def _metric(self, family: GaugeMetricFamily | CounterMetricFamily, value: float) -> Metric:
        family.add_metric([self.model_name], value)
        return family


def _hit_rate(stats: SchedulerStats) -> float:
    return stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0


class PrometheusMetrics:
    """The server's registry; `record_finished` is the AsyncLLM stat-logger hook."""

    def __init__(self, model_name: str, get_stats: Callable[[], SchedulerStats]) -> None:
        self.model_name = model_name
        disable_created_metrics()  # no `_created` series beside each histogram and counter, as vLLM
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between generated tokens.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to finish of a sequence.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            "vllm:request_success",
            "Finished sequences by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(SchedulerCollector(model_name, get_stats))

    def record_finished(self, timing: RequestTiming, now: float) -> None:
        if timing.first_token_time is not None:
            self.ttft.labels(self.model_name).observe(timing.first_token_time - timing.arrival_time)
        itl = self.itl.labels(self.model_name)
        for latency in timing.inter_token_latencies:
            itl.observe(latency)
        self.e2e.labels(self.model_name).observe(now - timing.arrival_time)
        self.success.labels(self.model_name, timing.finish_reason or "abort").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
