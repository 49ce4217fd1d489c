"""`--quantization gguf`: linear layers over the file's own blocks, on tiny GGUFs of each block type and on
the embedded SmolLM2 (Q4_1 layers, Q8_0 embedding)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from tokenmill import LLM, SamplingParams
from tokenmill.kernels import cpu
from tokenmill.loader import gguf_loader, iter_weights, load_hf_config, resolve_model
from tokenmill.model import gguf_linear
from tokenmill.model.gguf_linear import GGUFLinear, quantize_gguf
from tokenmill.model.layers.embedding import LMHead
from tokenmill.model.layers.linear import LinearBase
from tokenmill.worker.model_runner import build_model

requires_kernel = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"CPU kernels: {cpu.unavailable_reason()}"
)


def loaded_model(gguf_file: Path) -> nn.Module:
    source = resolve_model(str(gguf_file))
    model = build_model(load_hf_config(source), torch.device("cpu"), torch.float32)
    model.load_weights(iter_weights(source, torch.float32))
    return model


def exactly_rounded_activations(num_rows: int, features: int) -> torch.Tensor:
    """Integers in [-127, 127] with 127 in every block of 32: the kernel's int8 rounding keeps them as they
    are, so its products are the float layer's up to the order of the sums."""
    x = torch.randint(-126, 127, (num_rows, features), generator=torch.Generator().manual_seed(0)).float()
    x[:, ::32] = 127
    return x


@requires_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # llama: Q/K rows permuted in the file
@pytest.mark.parametrize("block_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_every_linear_layer_keeps_the_files_weights(
    arch: str, block_type: str, tiny_gguf: Callable[..., Path]
) -> None:
    gguf_file = tiny_gguf(arch, block_type)
    model = loaded_model(gguf_file)  # the float model: the file's weights, dequantized
    floats = {
        name: copy.deepcopy(module)
        for name, module in model.named_modules()
        if isinstance(module, LinearBase | LMHead)
    }
    assert quantize_gguf(model, gguf_file) == len(floats)
    for name, float_layer in floats.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, GGUFLinear)
        assert layer.block_format == ("Q8_0" if block_type == "Q8_0" else "Q4_1")
        x = exactly_rounded_activations(5, layer.input_size)
        expected = float_layer(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@requires_kernel
def test_the_default_model_generates_with_its_own_blocks() -> None:
    llm = LLM(quantization="gguf", max_model_len=256, kv_cache_memory=16 << 20)
    model = llm.engine.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 30 * 4 + 1 and not any(isinstance(m, LinearBase) for m in model.modules())
    assert {layer.block_format for layer in layers[:-1]} == {"Q4_1"}
    assert model.lm_head is layers[-1] and model.lm_head.block_format == "Q8_0"  # the tied embedding's
    assert model.model.fused_decode is not None  # decode steps take the fused C layer
    assert llm.engine.core.runner.kv_dtype == torch.float16  # auto: a quantized model's cache on CPU
    out = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert "Paris" in out[0].outputs[0].text


def test_a_model_that_is_not_gguf_is_a_clear_error(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(
        ValueError, match="is not a .gguf file: pass a .gguf model, or use --quantization int8"
    ):
        LLM(str(tiny_model_dir("llama")), quantization="gguf")


@requires_kernel
def test_layers_of_other_types_keep_their_float_weights(
    tiny_gguf: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    gguf_file = tiny_gguf("qwen2", "float16")
    model = loaded_model(gguf_file)
    with caplog.at_level("INFO", logger=gguf_linear.__name__):
        assert quantize_gguf(model, gguf_file) == 0
    assert not any(isinstance(m, GGUFLinear) for m in model.modules())
    # 4 per decoder layer (QKV, output, gate/up, down), 2 decoder layers, and the head
    assert "block types the kernel does not read: 9 of F16" in caplog.text


def test_off_the_cpu_the_model_keeps_its_dequantized_weights(
    tiny_gguf: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 8))
    with caplog.at_level(logging.WARNING, logger=gguf_linear.__name__):
        assert quantize_gguf(model, tiny_gguf("qwen2", "Q8_0")) == 0
    assert "on meta the model keeps the dequantized weights it was loaded with" in caplog.text


@requires_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied LM heads
def test_the_replaced_layers_are_never_dequantized(
    arch: str, tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading for gguf skips the float copy of every layer that keeps the file's blocks: only the
    embedding table (looked up in float) and the float32 norms and biases are dequantized."""
    dequantized: list[str] = []

    def recording(data: object, tensor_type: GGMLQuantizationType) -> object:
        dequantized.append(tensor_type.name)
        return dequantize(data, tensor_type)

    monkeypatch.setattr(gguf_loader, "dequantize", recording)
    llm = LLM(str(tiny_gguf(arch, "Q4_1", with_tokenizer=True)), quantization="gguf", max_model_len=128)
    assert dequantized.count("Q4_1") == 1  # the token embedding
    assert set(dequantized) == {"Q4_1", "F32"}
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate("Hello", greedy, use_tqdm=False)[0].outputs[0].token_ids) == 4
