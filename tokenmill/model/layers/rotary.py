"""Rotary position embedding (the rotate-half layout of Hugging Face checkpoints), with rope scaling."""

from __future__ import annotations

import contextlib
import ctypes
import math
from typing import Any

import torch
from torch import nn

from tokenmill.kernels.cpu import heads_contiguous, kernel_library, rotary
from tokenmill.kernels.gpu import triton_layer_ops


def rope_parameters(config: Any) -> dict[str, Any]:
    """A config's rope settings, old style (rope_theta + rope_scaling) or new (rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_inverse_frequencies(inv_freq, params)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


RotaryTables = tuple[torch.Tensor, torch.Tensor]  # a step's cos and sin, [num_tokens, 1, head_dim] each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; queries and keys may go through together.
    cos, sin = rope
    gpu_ops = triton_layer_ops(x)
    if gpu_ops is not None and cos.dtype == x.dtype:  # half precision on CUDA: one launch instead of five
        return gpu_ops.rotary(x, cos, sin)
    library = _rotary_kernel(x, cos, sin)
    if library is not None:  # one call instead of six ops, rounded the same (kernels/layer_ops.c)
        return rotary(library, x, cos, sin)
    return x * cos + rotate_half(x) * sin


def _rotary_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> ctypes.CDLL | None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not heads_contiguous(x):
        return None
    tables_fit = cos.shape[0] == x.shape[0] and cos.is_contiguous() and sin.is_contiguous()
    return kernel_library() if tables_fit else None


class RotaryEmbedding(nn.Module):
    cos_cache: torch.Tensor  # [max_position, head_dim] float32
    sin_cache: torch.Tensor

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.params = head_dim, max_position, params
        # Built on the meta device, the model gets its tables from build_model, on its real device (and
        # meta arithmetic would cost its first user ~0.8 s of imports).
        if torch.get_default_device().type != "meta":
            self.build_tables()

    def build_tables(self, device: torch.device | None = None) -> None:
        """Computes the cos/sin tables on `device` (default: the current one). A model built on the meta
        device has none until this runs: they are computed, not loaded."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            inv_freq = _inverse_frequencies(self.head_dim, self.params)  # [head_dim / 2], float32
            positions = torch.arange(self.max_position, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """The step's rotations, [num_tokens, 1, head_dim] each: looked up once per step for all layers."""
        cos = self.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(dtype).unsqueeze(1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        rope = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, rope), apply_rotary(k, rope)
