"""Int8 quantization: a transform applied to a loaded model (gpt-fast's model).

Every `LinearBase` layer whose input size is a multiple of 32, and the LM head, is replaced by an
`Int8Linear` holding symmetric int8 weights with one float32 scale per output channel. A tied LM head gets
its own int8 copy, so the embedding table keeps its float weights.

On x86-64 CPUs with AVX2 the products run in our C kernel (tokenmill/kernels/int8_linear.c), which also
quantizes each token's activations in blocks of 32 features (llama.cpp's Q8_0 layout): it reads a quarter
of float32's weight bytes and multiplies in int8. Against float32 `F.linear` on SmolLM2-135M's layers
(2-vCPU EPYC, numbers in benchmarks/RESULTS.md) it is several times faster for one token and still faster
at 64; from MAX_KERNEL_ROWS rows on (prefill chunks) float32 GEMM wins, so the weight is dequantized for
the call instead. Elsewhere (GPU, other CPUs, no compiler) the weight is always dequantized: the same
weights, float activations.

`GGUFLinear`, the layer `--quantization gguf` makes of a GGUF file's own blocks (model/gguf_linear.py), is
here beside `Int8Linear` because the fused decode step runs both and safetensors models never need `gguf`.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import QUANTIZATION_METHODS
from tokenmill.kernels.cpu import ACTIVATION_BLOCK, block_linear, int8_linear, kernel_library
from tokenmill.kernels.memory import pack_on_huge_pages
from tokenmill.loader.source import ModelSource
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import LinearBase
from tokenmill.model.registry import CausalLM

logger = logging.getLogger(__name__)

# Most rows (tokens) per call that take the int8 kernel; more rows dequantize the weight instead.
MAX_KERNEL_ROWS = 512


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `weight ~= q * scales[:, None]`, |error| <= scales / 2."""
    w = weight.float()  # [out, in]
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """`y = x @ (weight * scales[:, None]).T + bias` with int8 `weight` [out, in], float32 `scales` [out]."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        values, scales = quantize_per_channel_int8(weight)
        self.output_size, self.input_size = values.shape
        self.register_buffer("weight", values.to(weight.device))
        self.register_buffer("scales", scales.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // self.input_size
        library = kernel_library() if x.device.type == "cpu" else None
        if library is None or num_rows > MAX_KERNEL_ROWS:
            weight = self.weight.to(x.dtype).mul_(self.scales[:, None].to(x.dtype))
            return F.linear(x, weight, self.bias)
        float_bias = self.bias is None or self.bias.dtype == torch.float32
        if x.dim() == 2 and x.dtype == torch.float32 and float_bias:  # the model's calls: nothing to convert
            return int8_linear(library, x, self.weight, self.scales, self.bias)
        bias = None if self.bias is None else self.bias.float()
        rows = x.reshape(num_rows, self.input_size).float()
        out = int8_linear(library, rows, self.weight, self.scales, bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.output_size)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class GGUFLinear(nn.Module):
    """`y = x @ w.T + bias`, w held as a GGUF file's blocks in the kernel's layout (`weight` uint8
    [ceil(out / 8), group bytes], `block_format` Q4_1 or Q8_0)."""

    weight: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        block_format: str,
        output_size: int,
        input_size: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.output_size, self.input_size, self.block_format = output_size, input_size, block_format
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        library = kernel_library()
        assert library is not None, "GGUFLinear layers are only made where the CPU kernels run"
        rows = x.reshape(-1, self.input_size).float()
        out = block_linear(library, rows, self.weight, self.block_format, self.output_size, self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.output_size)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, {self.block_format}, bias={self.bias is not None}"
        )


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replaces (in place) every `LinearBase` of `model` whose input size is a multiple of 32, and its
    `lm_head`, by an `Int8Linear`; its RMSNorm and SiluAndMul layers take their C kernels on CPU."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LinearBase) or name == "lm_head"
        if module.weight.shape[1] % ACTIVATION_BLOCK == 0
    ]
    for name, module in targets:
        replace_module(model, name, Int8Linear(module.weight, getattr(module, "bias", None)))
    pack_int8_weights([m for m in model.modules() if isinstance(m, Int8Linear)])
    use_cpu_layer_ops(model)
    return model


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)


def use_cpu_layer_ops(model: nn.Module) -> None:
    """A quantized model is approximate already: its RMSNorm and SiluAndMul layers take their C kernels on
    CPU too (the float model keeps torch's, bit for bit transformers')."""
    for module in model.modules():
        if isinstance(module, RMSNorm | SiluAndMul):
            module.use_cpu_kernel = True


def pack_int8_weights(layers: list[Int8Linear]) -> None:
    """Moves the layers' int8 weights (on CPU) into one buffer on huge pages (kernels/memory.py)."""
    layers = [layer for layer in layers if layer.weight.device.type == "cpu"]
    for layer, packed in zip(layers, pack_on_huge_pages([layer.weight for layer in layers]), strict=True):
        layer.weight = packed


def check_quantization(method: str | None, source: ModelSource) -> None:
    """Raises ValueError, naming the fix, if `method` cannot apply to the model `source`."""
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}: choose one of {', '.join(QUANTIZATION_METHODS)}")
    if method == "gguf" and source.gguf_file is None:
        raise ValueError(
            f"--quantization gguf keeps a GGUF file's quantized weights, and {source.name} is not a .gguf "
            "file: pass a .gguf model, or use --quantization int8"
        )


def quantize(model: CausalLM, method: str | None) -> None:
    """Applies the quantization `method` to a loaded model, in place. None, and gguf, leave it as it is:
    gguf layers replace the float ones while the weights load (gguf_linear.plan_gguf_layers), and where its
    kernels do not run the model keeps its float weights."""
    if method is None or method == "gguf":
        return
    module = cast(nn.Module, model)
    if method == "int8":
        device = next(module.parameters()).device
        if device.type != "cpu":
            logger.warning(
                "int8 is a CPU speed-up: on %s its layers dequantize their weights for every call, which is "
                "slower than the unquantized model (leave --quantization unset there)",
                device.type,
            )
        quantize_int8(module)
        return
    raise ValueError(f"unknown quantization {method!r}: choose one of {', '.join(QUANTIZATION_METHODS)}")
