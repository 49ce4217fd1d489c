"""Weight-only int8: per-layer error bounds, the model transform, and greedy quality on SmolLM2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.model.quantization import MAX_INT8_KERNEL_ROWS, Int8Linear, quantize

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors: red,",
    "Water boils at a temperature of",
]
NUM_TOKENS = 32
BF16_EPS = 2.0**-8  # bfloat16's relative rounding error is at most 2^-9; 2^-8 leaves room


@pytest.mark.parametrize("num_rows", [1, MAX_INT8_KERNEL_ROWS, 64])
def test_int8_linear_within_rounding_bound(num_rows: int) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(384, 256) * 0.05, torch.randn(384)
    x = torch.randn(num_rows, 256)
    layer = Int8Linear(weight, bias)
    ours, reference = layer(x), F.linear(x, weight, bias)  # [num_rows, 384]
    # Per-channel rounding moves each weight by at most scale/2, so |error_j| <= scale_j / 2 * |x|_1. The
    # int8 kernel (few rows) also rounds x and its output to bfloat16: x by BF16_EPS * |x| against weights
    # of at most 127 * scale, the output by BF16_EPS * |y|.
    x_l1 = x.abs().sum(-1, keepdim=True)  # [num_rows, 1]
    bound = layer.scales * x_l1 * (0.5 + 127 * BF16_EPS) + BF16_EPS * reference.abs() + 1e-5
    assert ((ours - reference).abs() <= bound).all()
    # Gaussian weights: rounding error ~ scale / sqrt(12) against weights of std ~ max / 3.5, about 0.8%
    # of the output; bfloat16 activations add ~0.3%.
    assert (ours - reference).norm() / reference.norm() < 0.015


def test_dequantized_path_equals_int8_times_scales() -> None:
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(64, 32), None)
    x = torch.randn(MAX_INT8_KERNEL_ROWS + 1, 32)
    expected = x @ (layer.weight.float() * layer.scales[:, None]).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_quantized(arch: str, tiny_model_dir: Callable[[str], Path]) -> None:
    kwargs = dict(dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    reference = LLM(str(tiny_model_dir(arch)), **kwargs).engine.core.runner.model
    llm = LLM(str(tiny_model_dir(arch)), quantization="int8", **kwargs)
    model = llm.engine.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * reference.config.num_hidden_layers
    # float32: the LM head stays float (its logits would otherwise come back in bfloat16).
    assert not isinstance(model.lm_head, Int8Linear)
    qkv = model.model.layers[0].self_attn.qkv_proj
    reference_qkv = reference.model.layers[0].self_attn.qkv_proj
    if arch == "qwen2":
        assert qkv.bias is not None and torch.equal(qkv.bias, reference_qkv.bias)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert qkv.bias is None
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert all(len(o.outputs[0].token_ids) == 4 for o in llm.generate(PROMPTS, params, use_tqdm=False))


def test_tied_lm_head_of_bfloat16_model_gets_its_own_int8_copy(
    tiny_model_dir: Callable[[str], Path],
) -> None:
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
    dequantized = model.lm_head.weight.float() * model.lm_head.scales.float()[:, None]
    scales = model.lm_head.scales.float()[:, None]
    assert ((dequantized - embedding.float()).abs() <= scales * (0.5 + BF16_EPS * 127)).all()


def test_unknown_quantization_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int3': choose one of int8"):
        EngineArgs(quantization="int3").create_engine_config()
    with pytest.raises(ValueError, match="choose one of int8"):
        quantize(torch.nn.Linear(2, 2), "fp8")


@pytest.mark.slow
def test_smollm2_int8_greedy_agrees_with_float() -> None:
    """Int8 rounding shifts logits slightly, so greedy tokens may part ways where the float model is nearly
    tied; once they part, the continuations differ. Checked: tokens agree up to each parting, every parting
    is at a near-tie of the float model (top-2 gap under 0.5 nats), and most tokens (>= 80 of 160; 96
    measured) come before the partings."""
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    kwargs = dict(dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20)
    floats = LLM(**kwargs).generate(PROMPTS, params, use_tqdm=False)
    int8s = LLM(quantization="int8", **kwargs).generate(PROMPTS, params, use_tqdm=False)
    num_agreeing = 0
    for float_out, int8_out in zip(floats, int8s, strict=True):
        a, b = float_out.outputs[0], int8_out.outputs[0]
        pairs = enumerate(zip(a.token_ids, b.token_ids, strict=True))
        parting = next((i for i, (x, y) in pairs if x != y), NUM_TOKENS)
        num_agreeing += parting
        if parting < NUM_TOKENS:
            assert a.logprobs is not None
            top2 = sorted((lp.logprob for lp in a.logprobs[parting].values()), reverse=True)[:2]
            assert top2[0] - top2[1] < 0.5, f"int8 left a confident float token in {float_out.prompt!r}"
    assert num_agreeing >= 80
