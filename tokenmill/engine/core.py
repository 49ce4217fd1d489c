"""EngineCore: the scheduler and the model runner, stepping in one loop. Token ids in, token ids out.

It runs in-process for the offline `LLM` and in its own process behind the API server.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.engine.outputs import EngineCoreOutput, EngineCoreRequest, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kernels.cpu import kernel_library
from tokenmill.loader import (
    ModelSource,
    iter_weights,
    load_hf_config,
    resolve_dtype,
    resolve_model,
    sliding_window,
)
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.model.fused_decode import attach_fused_decode
from tokenmill.model.layers.linear import pack_cpu_half_weights
from tokenmill.model.quantization import check_quantization, quantize
from tokenmill.worker.launched_step import LaunchedStep
from tokenmill.worker.memory import GiB, check_explicit_kv_cache_fits, kv_cache_budget
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but CUDA is not available (no GPU, or torch built without "
            "CUDA): pass device 'cpu' or 'auto'"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPUs")
    return device


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    """`requested`, at most the model's limit. A longer one is served at the limit with a warning (as
    llama.cpp's server does; vLLM refuses to start), so that the vLLM image's `--max-model-len 32768`
    also serves a model of shorter context. A sliding-window model is served at most its window, where
    full attention (all that tokenmill implements) computes the same."""
    model_limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = sliding_window(hf_config)
    if window is not None and window < min(requested or model_limit, model_limit):
        logger.warning(
            "the model uses sliding-window attention (window %d tokens), which tokenmill does not "
            "implement: serving %d-token contexts",
            window,
            window,
        )
        return window
    if requested is None:
        return model_limit
    if requested > model_limit:
        logger.warning(
            "max_model_len=%d is longer than the model's limit of %d tokens (max_position_embeddings): "
            "serving %d-token contexts",
            requested,
            model_limit,
            model_limit,
        )
        return model_limit
    return requested


def gguf_quantization_hint(quantization: str | None, source: ModelSource, device: torch.device) -> str | None:
    """For a GGUF about to be dequantized on a CPU that runs its blocks' kernels: the flag that keeps them.
    Dequantizing stays the default: it computes what transformers computes from the file, token for token."""
    if quantization is not None or source.gguf_file is None or device.type != "cpu":
        return None
    if kernel_library() is None:
        return None
    return (
        f"{source.name}: its GGUF weights are dequantized to float; --quantization gguf keeps the file's "
        "Q4_0/Q4_1/Q8_0 blocks in CPU kernels instead (the default model decodes 4-10x faster on one "
        "stream, in a fraction of the memory)"
    )


def quantized_dtype_hint(quantization: str | None, dtype: torch.dtype, device: torch.device) -> str | None:
    """For a model quantized on CPU in a dtype other than float32, which its kernels take and return."""
    if quantization is None or device.type != "cpu" or dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"--quantization {quantization} computes in float32 on CPU: with --dtype {name} every layer "
        "converts around its kernels (the default model decoded one stream 3x slower in bfloat16); "
        "leave --dtype at auto"
    )


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device)
        config = dataclasses.replace(config, scheduler=config.scheduler.for_device(self.device.type))
        self.config = config
        self.source = resolve_model(config.model.model, config.model.download_dir, config.model.revision)
        check_quantization(config.model.quantization, self.source)
        if hint := gguf_quantization_hint(config.model.quantization, self.source, self.device):
            logger.info(hint)
        self.hf_config = load_hf_config(self.source, config.model.hf_overrides)
        self.dtype = resolve_dtype(config.model.dtype, self.device, config.model.quantization)
        if hint := quantized_dtype_hint(config.model.quantization, self.dtype, self.device):
            logger.warning(hint)
        self.max_model_len = resolve_max_model_len(config.model.max_model_len, self.hf_config)
        self.vocab_size: int = self.hf_config.vocab_size

        if self.device.type == "cpu":
            kernel_library()  # built (or loaded from the cache) now, not during the first request
        self.runner = ModelRunner(config, self.hf_config, self.device, self.dtype, self.max_model_len)
        if config.model.load_format == "dummy":
            self.runner.init_dummy_weights()
        else:
            self._load_weights(config.model.quantization)
        if config.model.quantization is not None:
            attach_fused_decode(self.runner.model)  # decode-only steps: one C call per layer on CPU
        pack_cpu_half_weights(cast(nn.Module, self.runner.model))  # bfloat16/float16 dense layers on CPU
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, self.max_model_len)
        # Only a device that runs behind the host gains from scheduling ahead of it.
        self.async_scheduling = config.scheduler.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda"
        self._launched: tuple[SchedulerOutput, LaunchedStep] | None = None

    def _load_weights(self, quantization: str | None) -> None:
        model, gguf_file = cast(nn.Module, self.runner.model), self.source.gguf_file
        if quantization == "gguf" and gguf_file is not None:
            from tokenmill.model.gguf_linear import apply_gguf_plan, plan_gguf_layers  # needs `gguf`

            plan = plan_gguf_layers(model, gguf_file, self.device)
            if plan is not None:
                # Layers that keep the file's blocks skip their float copy: never dequantized, never held.
                weights = iter_weights(self.source, self.dtype, plan.unloaded_tensors)
                self.runner.load_weights(weights, plan.replaced_parameters)
                apply_gguf_plan(model, plan)
                return
        self.runner.load_weights(iter_weights(self.source, self.dtype))
        quantize(self.runner.model, quantization)

    def _num_kv_blocks(self) -> int:
        profile = None
        if self.device.type == "cuda" and self.config.cache.kv_cache_memory is not None:
            check_explicit_kv_cache_fits(self.config.cache.kv_cache_memory, self.device)
        elif self.device.type == "cuda":
            profile = self.runner.profile_peak_memory(self.max_model_len)
        budget = kv_cache_budget(self.config.cache, self.device, profile)
        block_bytes = self.runner.kv_bytes_per_block()
        num_blocks = budget // block_bytes
        capacity = num_blocks * self.config.cache.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({budget / GiB:.2f} GiB) but max_model_len is "
                f"{self.max_model_len}: not even one full-length sequence fits. Lower --max-model-len or "
                "give the cache more memory (--kv-cache-memory, --gpu-memory-utilization)"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s)",
            num_blocks,
            self.config.cache.block_size,
            capacity,
            num_blocks * block_bytes / GiB,
            self.runner.kv_dtype,
        )
        return num_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> list[EngineCoreOutput]:
        """One step's outputs. With async scheduling they may be the previous step's: a step is launched,
        the next one scheduled and launched behind it, and only then are the first one's tokens read."""
        if self._launched is None:
            if not self.scheduler.has_unfinished_requests():
                return []
            scheduler_output = self.scheduler.schedule()
            if not self.async_scheduling:
                runner_output = self.runner.execute_model(scheduler_output)
                return self.scheduler.update_from_output(scheduler_output, runner_output)
            self._launched = (scheduler_output, self.runner.launch(scheduler_output))
        scheduler_output, launched = self._launched
        following = self.scheduler.schedule_after(scheduler_output)
        self._launched = None if following is None else (following, self.runner.launch(following, launched))
        return self.scheduler.update_from_output(scheduler_output, launched.output())

    def has_unfinished_requests(self) -> bool:
        return self._launched is not None or self.scheduler.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.get_stats()

    def shutdown(self) -> None:
        self.runner.release_kv_cache()
