"""Weight-only int8 quantization: a transform applied to a loaded model (gpt-fast's model).

Every `LinearBase` layer is replaced by an `Int8Linear` holding per-output-channel symmetric int8 weights
and one scale per output row; biases stay in float. The LM head is quantized only in bfloat16/float16
models: the int8 kernel's output is in the kernel's dtype, and bfloat16 logits of a float32 model would
round logprobs to steps of 1/8 nat at |logit| ~ 20 and turn near-ties into exact ties. A tied LM head gets
its own int8 copy, so the embedding table keeps its float weights.

Why two paths in `Int8Linear.forward` (measured on an AVX2 EPYC, torch 2.13, one thread, SmolLM2's
30 layers of weights streamed from memory): few rows are memory-bound and
`torch.ops.aten._weight_int8pack_mm` reads a quarter of float32's bytes (1 row: 20.5 ms vs 32.0 ms for
all layers' linears). Its float32 kernel is scalar on AVX2 (3x slower than float32 `F.linear`), so the
activations go in as bfloat16, whose kernel is vectorized. From about 16 rows on it loses to a float GEMM,
and more rows (prefill, large decode batches) dequantize the weight on the fly instead.
Caveat: the kernel splits every call across the OpenMP threads; where those threads share their cores
with other busy processes each call waits on a descheduled thread (2 threads on a loaded 2-core machine:
8 ms instead of 0.15 ms for SmolLM2's gate_up). Give it dedicated cores or OMP_NUM_THREADS=1.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import QUANTIZATION_METHODS
from tokenmill.model.layers.linear import LinearBase
from tokenmill.model.registry import CausalLM

# Most rows (tokens) per call that take the int8 GEMV kernel; more rows dequantize the weight instead.
MAX_INT8_KERNEL_ROWS = 16


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `weight ~= q * scales[:, None]`, |error| <= scales / 2."""
    w = weight.float()  # [out, in]
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


class Int8Linear(nn.Module):
    """`y = x @ (q * scales).T + bias` with int8 `q` [out, in] and float `scales` [out]."""

    weight: torch.Tensor
    scales: torch.Tensor
    kernel_scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scales = quantize_per_channel_int8(weight)
        self.output_size, self.input_size = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        # The int8 kernel wants activations in the scales' dtype; float32 goes through bfloat16 (above).
        kernel_dtype = torch.bfloat16 if scales.dtype == torch.float32 else scales.dtype
        self.register_buffer("kernel_scales", scales.to(kernel_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // self.input_size
        if x.device.type == "cpu" and num_rows <= MAX_INT8_KERNEL_ROWS:
            kernel_x = x.reshape(num_rows, self.input_size).to(self.kernel_scales.dtype)
            out = torch.ops.aten._weight_int8pack_mm(kernel_x, self.weight, self.kernel_scales)
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.output_size)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales  # [..., out]
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


@torch.no_grad()
def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """Replaces every `LinearBase` of `model` (in place) by an `Int8Linear`, and its `lm_head` unless the
    model is float32 (see the module docstring)."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LinearBase) or (name == "lm_head" and module.weight.dtype != torch.float32)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = getattr(module, "bias", None)
        setattr(parent, child, Int8Linear(module.weight, bias))
    return model


def quantize(model: CausalLM, method: str | None) -> None:
    """Applies the quantization `method` (None: none) to a loaded model, in place."""
    if method is None:
        return
    if method == "int8":
        quantize_int8_weight_only(cast(nn.Module, model))
        return
    raise ValueError(f"unknown quantization {method!r}: choose one of {', '.join(QUANTIZATION_METHODS)}")
