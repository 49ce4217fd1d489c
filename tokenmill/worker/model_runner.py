"""ModelRunner: SchedulerOutput -> tensors -> logits -> sampled tokens (and logprobs)."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata, kv_cache_shape
from tokenmill.attention.selector import get_attention_backend
from tokenmill.config import EngineConfig
from tokenmill.engine.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.kernels.memory import anonymous_tensor
from tokenmill.loader.dtype import resolve_kv_cache_dtype
from tokenmill.model.layers.attention import Attention
from tokenmill.model.layers.rotary import RotaryEmbedding
from tokenmill.model.llama import head_dim_of
from tokenmill.model.parameters import materialize
from tokenmill.model.registry import CausalLM, get_model_class
from tokenmill.sample.device import to_device
from tokenmill.sample.logprobs import LogprobsTensors, compute_logprobs
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import Sampler, SamplerOutput
from tokenmill.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from tokenmill.worker.cuda_graph import DecodeGraphs
from tokenmill.worker.inputs import HostStager, ModelInputs, prepare_inputs
from tokenmill.worker.launched_step import LaunchedStep, PromptLogprobsResults, SampledResults
from tokenmill.worker.memory import GiB, MemoryProfile

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
    ) -> None:
        self.config, self.hf_config = config, hf_config
        self.device, self.dtype = device, dtype
        self.kv_dtype = resolve_kv_cache_dtype(
            config.cache.kv_cache_dtype, dtype, device, config.model.quantization
        )
        self.block_size = config.cache.block_size
        self.model = build_model(hf_config, device, dtype)
        self.sampler = Sampler()
        self.stager = HostStager(device)
        self.generators: dict[str, torch.Generator] = {}
        self.decode_graphs: DecodeGraphs | None = None
        self.max_model_len = max_model_len
        self.default_generator = seeded_generator(device, config.model.seed)

    def load_weights(self, weights: Any, unloaded: frozenset[str] = frozenset()) -> None:
        """Loads the checkpoint's `weights`; every parameter must get one, except those named in `unloaded`
        (replaced after loading, as `--quantization gguf` replaces linear layers)."""
        loaded = self.model.load_weights((name, tensor.to(self.device)) for name, tensor in weights)
        missing = {name for name, _ in self.model.named_parameters()} - loaded - unloaded
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:8])}")

    @torch.inference_mode()
    def init_dummy_weights(self) -> None:
        """Small random weights in place of a checkpoint (norm weights 1), for benchmarks of a model shape."""
        materialize(cast(nn.Module, self.model), self.device, self.dtype)
        generator = seeded_generator(self.device, self.config.model.seed)
        for name, param in self.model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-1e-3, 1e-3, generator=generator)

    # --- KV cache ---------------------------------------------------------------------------------

    @property
    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def kv_bytes_per_block(self) -> int:
        cfg = self.hf_config
        per_layer = 2 * self.block_size * cfg.num_key_value_heads * head_dim_of(cfg)
        return per_layer * cfg.num_hidden_layers * self.kv_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        """Allocates `num_blocks` usable blocks plus one scratch block (the last) for padded graph rows."""
        backend = get_attention_backend(self.device, self.dtype)
        for layer in self.attention_layers:
            shape = kv_cache_shape(num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.kv_cache = zeroed_tensor(shape, self.kv_dtype, self.device)
            layer.backend = backend
        self.decode_graphs = None
        use_graphs = self.device.type == "cuda" and not self.config.enforce_eager
        if capture_graphs and use_graphs and backend.supports_cuda_graphs:
            self.decode_graphs = DecodeGraphs(
                self.model,
                self.config.scheduler.max_num_seqs,
                self.max_model_len,
                self.block_size,
                scratch_block=num_blocks,
                device=self.device,
            )
            self.decode_graphs.capture()

    @torch.inference_mode()
    def profile_peak_memory(self, max_model_len: int) -> MemoryProfile:
        """The weights' GPU bytes, and the peak the largest step adds to them (before the KV cache)."""
        torch.cuda.synchronize(self.device)
        weight_bytes = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            dummy_cache_bytes = self.run_largest_step(max_model_len)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(
                f"the GPU ran out of memory in a step of max_num_batched_tokens="
                f"{self.config.scheduler.token_budget} tokens and max_num_seqs="
                f"{self.config.scheduler.max_num_seqs} sampled rows, with {weight_bytes / GiB:.2f} GiB of "
                "weights loaded: lower --max-num-batched-tokens or --max-num-seqs"
            ) from None
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - dummy_cache_bytes
        self.release_kv_cache()
        torch.cuda.empty_cache()
        return MemoryProfile(weight_bytes, max(peak - weight_bytes, 0))

    @torch.inference_mode()
    def run_largest_step(self, max_model_len: int) -> int:
        """The most memory a step can take: a forward of a full token budget (`dummy_prefill`, with a KV
        cache just big enough), then logits and sampling for `max_num_seqs` rows on the costliest path
        (top-p's sort over the vocabulary, penalties, the widest logprobs). Returns the bytes of that
        stand-in KV cache, which is not part of the peak to keep free."""
        num_tokens = self.config.scheduler.token_budget
        ids, positions, metadata, num_blocks = dummy_prefill(
            num_tokens, max_model_len, self.block_size, self.device
        )
        self.allocate_kv_cache(num_blocks, capture_graphs=False)
        hidden = self.model(ids, positions, metadata)
        num_rows = self.config.scheduler.max_num_seqs
        rows = torch.arange(num_rows, device=hidden.device) % hidden.shape[0]
        logits = self.model.compute_logits(hidden[rows]).float()
        costliest = SamplingParams(
            temperature=1.0, top_p=0.9, repetition_penalty=1.1, logprobs=MAX_TOP_LOGPROBS
        )
        no_tokens = np.zeros(0, dtype=np.int64)
        sampling = SamplingMetadata.build(
            [costliest] * num_rows,
            [no_tokens] * num_rows,
            [no_tokens] * num_rows,
            [None] * num_rows,
            vocab_size=logits.shape[-1],
            device=self.device,
            default_generator=self.default_generator,
        )
        self.sampler(logits, sampling)
        return num_blocks * self.kv_bytes_per_block()

    def release_kv_cache(self) -> None:
        for layer in self.attention_layers:
            layer.kv_cache = torch.empty(0)
        self.decode_graphs = None

    # --- one step ---------------------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(scheduler_output).output()

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queues the step's forward pass and sampling on the device without reading the sampled tokens
        back (on CUDA the host returns while the device works). `previous`: the step whose sampled tokens
        are this step's inputs, when it was scheduled early (`scheduler_output.previous_rows`)."""
        for request_id in scheduler_output.finished_request_ids:
            self.generators.pop(request_id, None)
        if scheduler_output.is_empty:
            return LaunchedStep([], None, None, ModelRunnerOutput({}))
        inputs = prepare_inputs(scheduler_output, self.block_size, self.stager)
        if inputs.previous_rows is not None:
            if previous is None or previous.sampled is None:
                raise ValueError("a step scheduled early needs the step whose sampled tokens it decodes")
            inputs.input_ids = previous.sampled.sampled_token_ids.index_select(0, inputs.previous_rows)
        if self.decode_graphs is not None and self.decode_graphs.can_run(inputs):
            hidden = self.decode_graphs.run(inputs)  # [num_tokens, hidden]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        rows = [scheduler_output.scheduled[i] for i in inputs.sample_seq_indices]
        sampled = self._sample(rows, inputs, hidden)
        results = None if sampled is None else SampledResults.copy_to_host(sampled)
        prompt_logprobs = PromptLogprobsResults.copy_to_host(
            {
                scheduled.request_id: self._prompt_logprobs(
                    scheduled, inputs.attn_metadata.query_start_loc[i], hidden
                )
                for i, scheduled in enumerate(scheduler_output.scheduled)
                if scheduled.request.wants_prompt_logprobs
            }
        )
        return LaunchedStep(rows, sampled, results, ModelRunnerOutput({}), prompt_logprobs)

    def _sample(
        self, rows: list[ScheduledRequest], inputs: ModelInputs, hidden: torch.Tensor
    ) -> SamplerOutput | None:
        if not rows:
            return None
        logits = self.model.compute_logits(hidden[inputs.sample_indices]).float()  # [num_rows, vocab]
        metadata = SamplingMetadata.build(
            [r.request.sampling_params for r in rows],
            [r.request.prompt_token_ids_array for r in rows],
            [r.request.output_token_ids for r in rows],
            [self._generator(r) for r in rows],
            vocab_size=logits.shape[-1],
            device=self.device,
            default_generator=self.default_generator,
        )
        return self.sampler(logits, metadata)

    def _generator(self, scheduled: ScheduledRequest) -> torch.Generator | None:
        seed = scheduled.request.sampling_params.seed
        if seed is None:
            return None
        if scheduled.request_id not in self.generators:
            self.generators[scheduled.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[scheduled.request_id]

    def _prompt_logprobs(
        self, scheduled: ScheduledRequest, start_row: int, hidden: torch.Tensor
    ) -> LogprobsTensors | None:
        """The chunk's prompt logprobs, on the device (read back with the step's results); None when the
        chunk predicts no prompt token (the prompt's last position)."""
        # Position p predicts prompt token p + 1; the chunk covers positions [start, start + num_new).
        request = scheduled.request
        start = scheduled.num_computed_tokens
        end = min(start + scheduled.num_new_tokens, request.num_prompt_tokens - 1)
        if end <= start:
            return None
        logits = self.model.compute_logits(hidden[start_row : start_row + end - start]).float()
        next_tokens = to_device(torch.tensor(request.prompt_token_ids[start + 1 : end + 1]), self.device)
        num_top = request.sampling_params.prompt_logprobs or 0
        return compute_logprobs(logits, next_tokens, num_top)


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded with `seed`; None: a random seed (an unseeded engine, as vLLM's)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def dummy_prefill(
    num_tokens: int, max_model_len: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """A step's worth of prompt tokens (input ids, positions, metadata, KV blocks they need), as the
    scheduler could fill one: `num_tokens` in as many sequences as `max_model_len` allows."""
    lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    blocks = [-(-length // block_size) for length in lengths]
    block_tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int64)
    first_block = 0
    for row, count in enumerate(blocks):
        block_tables[row, :count] = torch.arange(first_block, first_block + count)
        first_block += count
    positions = torch.cat([torch.arange(length) for length in lengths])
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slots = block_tables[rows, positions // block_size] * block_size + positions % block_size
    metadata = AttentionMetadata(
        slot_mapping=slots.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(lengths, device=device),
        query_start_loc=[0, *itertools.accumulate(lengths)],
        query_lens=lengths,
        context_lens=[0] * len(lengths),
        block_size=block_size,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    return ids, positions.to(device), metadata, sum(blocks)


def zeroed_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor. On CPU it maps anonymous memory: the kernel supplies zero pages as they are
    first touched, so a large KV cache costs nothing until used (torch.zeros would write every byte)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return anonymous_tensor(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def build_model(hf_config: Any, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model with its parameters on the meta device (no memory: loading assigns each its checkpoint
    tensor, in `dtype` on `device`) and its computed tables (rotary) on `device`."""
    model_class = get_model_class(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    return cast(CausalLM, model.eval())
