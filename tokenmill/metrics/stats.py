"""Plain stats dataclasses: the engine fills them, loggers and the Prometheus exporter read them."""

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler and KV cache, taken after a step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, tokens found (cumulative)
    num_preemptions: int = 0  # cumulative
    num_prompt_tokens: int = 0  # prompt tokens of requests that produced their first token, cached ones too
    num_generation_tokens: int = 0  # tokens sampled (cumulative)
