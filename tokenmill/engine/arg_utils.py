"""`EngineArgs`: the flat set of engine options a user passes (as `LLM(**kwargs)` or `serve` flags).

`create_engine_config()` turns them into the frozen `EngineConfig` tree. The `serve` flags are generated
from these fields (see `tokenmill/entrypoints/cli_args.py`), so a new option is added here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tokenmill.config import (
    QUANTIZATION_METHODS,
    CacheConfig,
    Dtype,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

_NUMBER_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*$")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
# Options that are counts: at least 1.
_POSITIVE_INTS = ("block_size", "max_num_seqs", "tensor_parallel_size")


def parse_human_int(value: str | int) -> int:
    """'32768', '32k' (32000), '32K' (32768), '1.5k' (1500), '4GiB', '512MB' -> an int (vLLM's suffixes:
    lowercase decimal, uppercase binary; byte sizes KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    if isinstance(value, int):
        return value
    match = _NUMBER_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a number (examples: 2048, 32k, 32K, 4GiB)")
    number, unit, byte_suffix = match.groups()
    binary = unit.isupper() if not byte_suffix else byte_suffix.lower() == "ib"
    scale = (1024 if binary else 1000) ** _POWERS[unit.lower()]
    result = float(number) * scale
    if result != int(result):
        raise ValueError(f"{value!r} is not a whole number")
    return int(result)


@dataclass
class EngineArgs:
    """Engine options with vLLM's names. Each field's comment is its --help text."""

    model: str | None = None
    """Local HF directory, .gguf file or hub id; omitted: the embedded default model."""
    served_model_name: str | None = None
    """Name the API reports and accepts (defaults to the model argument)."""
    dtype: Dtype = "auto"
    """Compute dtype: auto (bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16, float16."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens (accepts 32k, 1.5k); default: the model's limit."""
    download_dir: str | None = None
    """Directory for models downloaded from the hub."""
    revision: str | None = None
    """Hub revision to download."""
    tokenizer: str | None = None
    """Tokenizer to use instead of the model's own: a HF directory, a .gguf file or a hub id (as vLLM
    advises for GGUF models: their base model's tokenizer and chat template)."""
    tokenizer_revision: str | None = None
    """Hub revision of --tokenizer."""
    seed: int | None = 0
    """Seed for requests that do not bring their own (None: a random one)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_memory: int | None = None
    """KV cache size in bytes (accepts 4GiB, 512MiB); default: sized from free memory."""
    kv_cache_dtype: Dtype = "auto"
    """KV cache element type: auto (the model's; float16 for quantized models on CPU), float32, float16."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory to use for weights, activations and the KV cache."""
    enable_prefix_caching: bool = True
    """Reuse cached KV blocks of shared prompt prefixes."""
    max_num_seqs: int = 256
    """Most sequences in one batch."""
    max_num_batched_tokens: int | None = None
    """Most tokens computed in one step (prefill chunks plus decodes); default: 512 on CPU, 2048 on GPU."""
    max_waiting: int = 4096
    """Most queued requests before new ones are refused with 503."""
    tensor_parallel_size: int = 1
    """Number of GPUs to split the model across."""
    enforce_eager: bool = False
    """Run every decode step op by op: no CUDA graphs (tokenmill compiles no models; on CPU it changes
    nothing)."""
    async_scheduling: bool | None = None
    """Schedule each decode step while the GPU runs the one before (default: on with CUDA)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """Values that replace fields of the model's config."""
    load_format: Literal["auto", "dummy"] = "auto"
    """auto: load the checkpoint; dummy: random weights of the model's shape (benchmarks)."""
    quantization: str | None = None
    """int8: int8 linear layers and LM head after loading (2-3x faster decode on x86 CPUs with AVX2);
    gguf: a GGUF model's own Q4_0/Q4_1/Q8_0 weights, not dequantized (CPU kernels, as int8)."""

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def __post_init__(self) -> None:
        for name in ("max_model_len", "kv_cache_memory"):  # LLM(kv_cache_memory="4GiB") as on the CLI
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, parse_human_int(value))
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None

    def _check_ranges(self) -> None:
        for name in _POSITIVE_INTS:
            _check_integer(name, getattr(self, name), minimum=1)
        for name in ("max_model_len", "kv_cache_memory", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                _check_integer(name, getattr(self, name), minimum=1, unset_allowed=True)
        _check_integer("max_waiting", self.max_waiting, minimum=0)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def create_engine_config(self) -> EngineConfig:
        self._check_ranges()
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet: "
                "tokenmill runs a model on one device; pass --tensor-parallel-size 1"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"unknown quantization {self.quantization!r}: choose one of {', '.join(QUANTIZATION_METHODS)}"
            )
        return EngineConfig(
            model=ModelConfig(
                model=self.model,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                download_dir=self.download_dir,
                revision=self.revision,
                tokenizer=self.tokenizer,
                tokenizer_revision=self.tokenizer_revision,
                seed=self.seed,
                served_model_name=self.served_model_name,
                hf_overrides=dict(self.hf_overrides),
                load_format=self.load_format,
                quantization=self.quantization,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=self.kv_cache_memory,
                kv_cache_dtype=self.kv_cache_dtype,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_waiting=self.max_waiting,
                async_scheduling=self.async_scheduling,
            ),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            device=self.device,
            enforce_eager=self.enforce_eager,
        )


def _check_integer(name: str, value: Any, minimum: int, unset_allowed: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}{' (or unset)' if unset_allowed else ''}, got {value!r}")
