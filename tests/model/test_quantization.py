"""Int8 layers: error bounds on both paths, the model transform, and greedy quality on SmolLM2."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.kernels import cpu
from tokenmill.model import quantization
from tokenmill.model.layers.linear import LinearBase
from tokenmill.model.quantization import MAX_KERNEL_ROWS, Int8Linear, quantize

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors: red,",
    "Water boils at a temperature of",
]
NUM_TOKENS = 32


@pytest.mark.parametrize("num_rows", [1, 16, MAX_KERNEL_ROWS + 1])
def test_int8_linear_within_rounding_bound(num_rows: int) -> None:
    """Few rows take the C kernel where it runs (it also rounds x per block of 32 features), more rows
    the dequantized weight; either way within the rounding bounds."""
    torch.manual_seed(0)
    weight, bias = torch.randn(384, 256) * 0.05, torch.randn(384)
    x = torch.randn(num_rows, 256)
    layer = Int8Linear(weight, bias)
    ours, reference = layer(x), F.linear(x, weight, bias)  # [num_rows, 384]
    # Per-channel rounding moves each weight by at most scale/2: |error_j| <= scale_j / 2 * |x|_1. Rounding
    # x to int8 per block moves each x_i by at most its block's max|x| / 254, against weights of at most
    # 127 * scale_j.
    blocks = x.reshape(num_rows, 8, 32).abs()
    x_rounding = (blocks.amax(-1, keepdim=True) / 254).expand_as(blocks).reshape(num_rows, 256)
    weight_bound = layer.scales * x.abs().sum(-1, keepdim=True) / 2
    x_bound = 127 * layer.scales * x_rounding.sum(-1, keepdim=True)
    assert ((ours - reference).abs() <= weight_bound + x_bound + 1e-4).all()
    # Gaussian weights: rounding error ~ scale / sqrt(12) against weights of std ~ max / 3.5, about 0.8%
    # of the output; rounding x adds about as much.
    assert (ours - reference).norm() / reference.norm() < 0.02


def test_dequantized_path_equals_int8_times_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "kernel_library", lambda: None)  # as on a CPU without the kernel
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(64, 32), torch.randn(64))
    x = torch.randn(5, 32)
    expected = x @ (layer.weight.float() * layer.scales[:, None]).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="no int8 CPU kernel here")
def test_few_rows_take_the_kernel_and_many_the_dequantized_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    kernel = quantization.int8_linear

    def counting_kernel(library, x, *args):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return kernel(library, x, *args)

    monkeypatch.setattr(quantization, "int8_linear", counting_kernel)
    layer = Int8Linear(torch.randn(64, 32), None)
    layer(torch.randn(2, 3, 32))  # any leading shape: 6 rows
    layer(torch.randn(MAX_KERNEL_ROWS + 1, 32))
    assert calls == [6]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_quantized(arch: str, tiny_model_dir: Callable[[str], Path]) -> None:
    kwargs = dict(dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    reference = LLM(str(tiny_model_dir(arch)), **kwargs).engine.core.runner.model
    llm = LLM(str(tiny_model_dir(arch)), quantization="int8", **kwargs)
    model = llm.engine.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * reference.config.num_hidden_layers + 1  # and the LM head
    assert isinstance(model.lm_head, Int8Linear)
    qkv = model.model.layers[0].self_attn.qkv_proj
    reference_qkv = reference.model.layers[0].self_attn.qkv_proj
    if arch == "qwen2":
        assert qkv.bias is not None and torch.equal(qkv.bias, reference_qkv.bias)
    else:
        assert qkv.bias is None
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert all(len(o.outputs[0].token_ids) == 4 for o in llm.generate(PROMPTS, params, use_tqdm=False))


def test_tied_lm_head_gets_its_own_int8_copy(tiny_model_dir: Callable[[str], Path]) -> None:
    llm = LLM(
        str(tiny_model_dir("qwen2")),
        dtype="bfloat16",
        max_model_len=256,
        kv_cache_memory=16 << 20,
        quantization="int8",
    )
    model = llm.engine.core.runner.model
    embedding = model.model.embed_tokens.weight  # [vocab, hidden], untouched bfloat16
    assert isinstance(model.lm_head, Int8Linear) and embedding.dtype == torch.bfloat16
    scales = model.lm_head.scales[:, None]
    dequantized = model.lm_head.weight.float() * scales
    assert ((dequantized - embedding.float()).abs() <= scales * (0.5 + 1e-4)).all()  # float rounding
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_unknown_quantization_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int3': choose one of int8"):
        EngineArgs(quantization="int3").create_engine_config()
    with pytest.raises(ValueError, match="choose one of int8"):
        quantize(torch.nn.Linear(2, 2), "fp8")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "gguf"])
def test_smollm2_quantized_predicts_the_float_models_tokens(method: str) -> None:
    """Int8 rounding (weights, LM head and activations; gguf: activations only) shifts logits slightly.
    Teacher-forced on the float model's own greedy continuations, the quantized model's top token must be
    the float model's at >= 90% of the 160 positions (152 measured with each), only where the float model
    was nearly tied (top-2 gap under 1 nat), and its perplexity of those continuations within 5% of the float
    model's (measured: int8 1.1% higher, gguf 0.6%)."""
    greedy = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    kwargs = dict(dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20)
    floats = LLM(**kwargs).generate(PROMPTS, greedy, use_tqdm=False)
    texts = [{"prompt_token_ids": out.prompt_token_ids + out.outputs[0].token_ids} for out in floats]
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=1)
    quantized = LLM(quantization=method, **kwargs).generate(texts, scoring, use_tqdm=False)
    agreeing, float_nll, quantized_nll = 0, 0.0, 0.0
    for float_out, quantized_out in zip(floats, quantized, strict=True):
        completion, start = float_out.outputs[0], len(float_out.prompt_token_ids)
        assert completion.logprobs is not None and quantized_out.prompt_logprobs is not None
        for step, token in enumerate(completion.token_ids):
            float_top2 = sorted((lp.logprob for lp in completion.logprobs[step].values()), reverse=True)
            quantized_scores = quantized_out.prompt_logprobs[start + step]
            assert quantized_scores is not None
            quantized_top = max(quantized_scores, key=lambda t: quantized_scores[t].logprob)
            if quantized_top == token:
                agreeing += 1
            else:
                gap = float_top2[0] - float_top2[1]
                assert gap < 1.0, f"{method} left a confident token: {float_out.prompt!r}"
            float_nll -= completion.logprobs[step][token].logprob
            quantized_nll -= quantized_scores[token].logprob
    num_positions = len(PROMPTS) * NUM_TOKENS
    assert agreeing >= 0.9 * num_positions
    assert math.exp(quantized_nll / num_positions) < 1.05 * math.exp(float_nll / num_positions)


def test_int8_off_the_cpu_warns_that_it_is_slower(caplog: pytest.LogCaptureFixture) -> None:
    with torch.device("meta"):  # any device but the CPU takes the dequantizing path
        model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    with caplog.at_level("WARNING", logger=quantization.__name__):
        quantize(model, "int8")  # type: ignore[arg-type]
    assert "on meta its layers dequantize their weights for every call" in caplog.text


def test_int8_weights_are_packed_into_one_huge_page_buffer(tiny_model_dir: Callable[[str], Path]) -> None:
    """Decode streams every weight byte once per step: they share one 2 MB-aligned mapping (huge pages
    where the OS allows), each weight starting on a cache line, values unchanged."""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    model = llm.engine.core.runner.model
    originals = {
        name: quantization.quantize_per_channel_int8(module.weight)[0] for name, module in _linears(model)
    }
    quantize(model, "int8")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    assert layers.keys() == originals.keys()
    storages = {layer.weight.untyped_storage().data_ptr() for layer in layers.values()}
    assert len(storages) == 1
    assert min(layer.weight.data_ptr() for layer in layers.values()) % (2 << 20) == 0
    for name, layer in layers.items():
        assert layer.weight.data_ptr() % 64 == 0 and torch.equal(layer.weight, originals[name])


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LinearBase) or name == "lm_head"
    ]
