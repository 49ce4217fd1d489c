"""The engine's configuration: frozen dataclasses, one per concern, gathered in `EngineConfig`.

Every field has a type, a default and a docstring-comment; the `serve` CLI flags are generated from the
`EngineArgs` fields in `tokenmill/engine/arg_utils.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16", "float", "half"]
QUANTIZATION_METHODS = ("int8", "gguf")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """Local HF directory, .gguf file or hub id; None: the embedded default model."""
    dtype: Dtype = "auto"
    """Compute dtype. auto: bfloat16 on GPUs and on CPUs with native bf16, else float32."""
    max_model_len: int | None = None
    """Longest prompt + completion; None: the model's own limit."""
    download_dir: str | None = None
    """Where hub downloads go (HF cache when None)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    tokenizer: str | None = None
    """Tokenizer directory, .gguf file or hub id; None: the model's own."""
    tokenizer_revision: str | None = None
    """Hub revision of `tokenizer`."""
    seed: int | None = 0
    """Seed of the engine's default generator (requests without their own seed); None: a random one."""
    served_model_name: str | None = None
    """Name reported by the API; defaults to the model argument."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """Values that replace the model's config fields."""
    load_format: Literal["auto", "dummy"] = "auto"
    """auto: the checkpoint's weights; dummy: small random weights (benchmarks of a shape, no checkpoint)."""
    quantization: str | None = None
    """Applied after loading. int8: per-channel int8 linear layers and LM head, with activations rounded
    to int8 blocks on x86 CPUs with AVX2 (2-3x faster CPU decode, a quarter of float32's weight memory);
    gguf (a .gguf model): the linear layers and LM head keep the file's Q4_0/Q4_1/Q8_0 blocks (no weight
    rounded again), same kernels and CPUs; None: the weights as loaded (a GGUF's dequantized)."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache; None: a fraction of free RAM (CPU) or gpu_memory_utilization (GPU)."""
    kv_cache_dtype: Dtype = "auto"
    """The cache's element type. auto: the model's dtype; float16 for int8/gguf-quantized float32 models on
    CPU (half the bytes read per cached token at decode)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory the engine may use (weights + activations + KV cache)."""
    cpu_kv_cache_fraction: float = 0.25
    """On CPU, with kv_cache_memory unset: this fraction of available RAM, capped by max_cpu_kv_cache."""
    max_cpu_kv_cache: int = 4 << 30
    """Upper bound of the automatic CPU KV cache size in bytes."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (prefill chunks + decodes); None: the device's (`for_device`)."""
    max_waiting: int = 4096
    """Most requests queued before new ones are refused."""
    long_prefill_token_threshold: int = 0
    """Cap on one request's prefill chunk per step; 0: no cap beyond the budget."""
    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before reading step N's tokens; None: on with CUDA."""

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with an unset token budget set for `device_type`: 512 tokens on CPU, where a burst
        of prompts is then prefilled a few at a time and the first ones start decoding sooner (issue 6's
        c=16 TTFT p50 0.53-0.58 s instead of 1.17-1.18 s, throughput as high or higher:
        benchmarks/RESULTS.md); 2048 on a GPU, which wants long prefill steps."""
        if self.max_num_batched_tokens is not None:
            return self
        return replace(self, max_num_batched_tokens=512 if device_type == "cpu" else 2048)

    @property
    def token_budget(self) -> int:
        if self.max_num_batched_tokens is None:
            raise ValueError("the token budget is set per device: use SchedulerConfig.for_device first")
        return self.max_num_batched_tokens


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """GPUs a model is split across (only 1 is supported for now)."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    enforce_eager: bool = False
    """No CUDA graphs: every decode step runs op by op."""
