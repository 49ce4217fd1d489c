"""The fused decode layer (kernels/decode_layer.c) against the model's modules, step for step, with int8
weights and with a GGUF file's own blocks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.kernels import cpu
from tokenmill.model.fused_decode import FusedDecode

requires_kernel = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"CPU kernels: {cpu.unavailable_reason()}"
)

# Ten prompts of different lengths: the attention kernel gives each sequence its own task from 2 x threads
# sequences on, and splits KV heads over the threads below that; both run here.
PROMPTS = [f"Prompt {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 4 + 1) for i in range(10)]


def quantized_llm(model: Path, quantization: str = "int8", kv_cache_dtype: str = "auto") -> LLM:
    # No prefix caching: the second run of a prompt would prefill only its uncached tail, which rounds
    # differently from the first run's whole prefill; the comparison is of decode steps.
    return LLM(
        str(model),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory=16 << 20,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        enable_prefix_caching=False,
    )


@requires_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
@pytest.mark.parametrize("quantization", ["int8", "gguf"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])  # auto: float16
def test_fused_decode_is_bit_for_bit_the_modules(
    arch: str,
    quantization: str,
    kv_cache_dtype: str,
    tiny_model_dir: Callable[[str], Path],
    tiny_gguf: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if quantization == "gguf":  # both of the kernel's block formats, one per architecture
        block_type = "Q4_1" if arch == "llama" else "Q8_0"
        llm = quantized_llm(tiny_gguf(arch, block_type, with_tokenizer=True), "gguf", kv_cache_dtype)
    else:
        llm = quantized_llm(tiny_model_dir(arch), kv_cache_dtype=kv_cache_dtype)
    model = llm.engine.core.runner.model.model
    fused = model.fused_decode
    assert fused is not None
    calls = []
    monkeypatch.setattr(FusedDecode, "__call__", _counting(FusedDecode.__call__, calls))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    for batch in (PROMPTS[:1], PROMPTS):
        with_fused = llm.generate(batch, params, use_tqdm=False)
        model.fused_decode = None  # the modules, one kernel call at a time
        without = llm.generate(batch, params, use_tqdm=False)
        model.fused_decode = fused
        for ours, theirs in zip(with_fused, without, strict=True):
            assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
            assert ours.outputs[0].logprobs == theirs.outputs[0].logprobs  # exact floats
    assert len(calls) == 2 * 11  # every decode step of both batches took the fused path


@requires_kernel
def test_models_it_does_not_handle_keep_their_modules(tiny_model_dir: Callable[[str], Path]) -> None:
    qwen3 = quantized_llm(tiny_model_dir("qwen3")).engine.core.runner.model.model  # q/k norms
    assert qwen3.fused_decode is None
    float_model = LLM(
        str(tiny_model_dir("llama")), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20
    )
    assert float_model.engine.core.runner.model.model.fused_decode is None  # float: bit for bit transformers


def _counting(function: Callable[..., object], calls: list[int]) -> Callable[..., object]:
    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return function(*args, **kwargs)

    return counted
