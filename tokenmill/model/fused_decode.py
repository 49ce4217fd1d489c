"""Decode-only steps of a quantized Llama-family model (`--quantization int8` or `gguf`) on CPU in one C call
per layer (kernels/decode_layer.c).

At decode a layer's kernels take a few hundred microseconds and the Python between them (module calls,
views, checks, nine ctypes calls) about a hundred more; this path keeps the kernels and drops the rest.
It calls the same kernels in the same order as the modules, so its results are theirs bit for bit. Steps
it does not handle (prefill, mixed batches, more rows than the int8 kernel takes) run through the modules.
"""

from __future__ import annotations

import ctypes
from typing import TypeGuard, cast

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.kernels.cpu import BLOCK_FORMATS, KV_FORMATS, cache_halves, kernel_library
from tokenmill.kernels.decode_layer import FORMAT_INT8, DecoderLayer, DecodeStep, LayerWeight
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.rotary import RotaryTables
from tokenmill.model.llama import LlamaDecoderLayer, LlamaModel
from tokenmill.model.quantization import MAX_KERNEL_ROWS, GGUFLinear, Int8Linear


class FusedDecode:
    def __init__(self, layers: list[LlamaDecoderLayer], library: ctypes.CDLL) -> None:
        self.decoder_layers, self.library = layers, library
        # Looked up once: a step reads their caches, and a submodule lookup costs a microsecond or two.
        self._attentions = [layer.self_attn.attn for layer in layers]
        self._layers: list[DecoderLayer] = []
        self._caches: list[int] = []  # the KV cache addresses the layer structures were built for
        self._workspace_floats = 0  # per sequence

    @classmethod
    def for_model(cls, model: nn.Module) -> FusedDecode | None:
        """The fused path for a LlamaModel whose every layer it handles (int8 or GGUF-block linears, no q/k
        norm, float32 norms), or None."""
        if not isinstance(model, LlamaModel):
            return None
        layers = [layer for layer in model.layers if _handled(layer)]
        if len(layers) != len(model.layers):
            return None
        library = kernel_library()
        return None if library is None else cls(layers, library)

    def applies(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> bool:
        return (
            metadata.decode_only
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and hidden.shape[0] <= MAX_KERNEL_ROWS  # beyond, Int8Linear dequantizes: the modules' numbers
            and metadata.block_tables.stride(1) == 1
            and metadata.seq_lens.is_contiguous()
            and metadata.slot_mapping.is_contiguous()
        )

    def __call__(
        self, hidden: torch.Tensor, rope: RotaryTables, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs every layer on `hidden` [num_seqs, hidden_size] (the embeddings, overwritten); returns the
        last layer's output and the residual stream, as the module loop leaves them."""
        layers = self._bound_layers()
        cos, sin = (table.contiguous() for table in rope)
        hidden = hidden.contiguous()
        residual = torch.empty_like(hidden)
        workspace = torch.empty(hidden.shape[0] * self._workspace_floats, dtype=torch.float32)
        tables = metadata.block_tables
        step = DecodeStep(
            hidden.shape[0],
            cos.data_ptr(),
            sin.data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            metadata.seq_lens.data_ptr(),
            metadata.slot_mapping.data_ptr(),
            workspace.data_ptr(),
        )
        hidden_ptr, residual_ptr = hidden.data_ptr(), residual.data_ptr()
        for i, layer in enumerate(layers):
            if self.library.tm_decode_layer(
                ctypes.byref(layer), ctypes.byref(step), hidden_ptr, residual_ptr, i == 0
            ):
                raise MemoryError("the fused decode layer could not allocate its kernels' scratch")
        return hidden, residual

    def _bound_layers(self) -> list[DecoderLayer]:
        """The layers' structures, rebuilt when the runner has bound new KV caches."""
        caches = [attention.kv_cache.data_ptr() for attention in self._attentions]
        if caches != self._caches:
            self._layers = [_layer_struct(layer) for layer in self.decoder_layers]
            self._caches = caches
            self._workspace_floats = max(
                self.library.tm_decode_layer_workspace(ctypes.byref(s)) for s in self._layers
            )
        return self._layers


def attach_fused_decode(model: object) -> bool:
    """Gives every LlamaModel inside `model` its fused decode path where it applies; True if any got one."""
    attached = False
    for module in cast(nn.Module, model).modules():
        if isinstance(module, LlamaModel):
            module.fused_decode = FusedDecode.for_model(module)
            attached |= module.fused_decode is not None
    return attached


def _handled(layer: nn.Module) -> TypeGuard[LlamaDecoderLayer]:
    if not isinstance(layer, LlamaDecoderLayer):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (
        attn.q_norm is None
        and all(_quantized(linear) and _float32_or_none(linear.bias) for linear in linears)
        and isinstance(mlp.act_fn, SiluAndMul)
        and all(isinstance(norm, RMSNorm) and norm.weight.dtype == torch.float32 for norm in norms)
        and norms[0].eps == norms[1].eps
        and attn.head_dim % 8 == 0
        and norms[0].weight.shape[0] % 8 == 0
    )


def _quantized(linear: nn.Module) -> bool:
    return isinstance(linear, Int8Linear | GGUFLinear)


def _float32_or_none(bias: torch.Tensor | None) -> bool:
    return bias is None or bias.dtype == torch.float32


def _layer_weight(linear: nn.Module) -> LayerWeight:
    assert isinstance(linear, Int8Linear | GGUFLinear)
    bias = None if linear.bias is None else linear.bias.data_ptr()
    if isinstance(linear, GGUFLinear):
        scales, layout = None, BLOCK_FORMATS[linear.block_format]
    else:
        scales, layout = linear.scales.data_ptr(), FORMAT_INT8
    return LayerWeight(linear.weight.data_ptr(), scales, bias, linear.output_size, linear.input_size, layout)


def _layer_struct(layer: LlamaDecoderLayer) -> DecoderLayer:
    attn = layer.self_attn.attn
    keys, values = cache_halves(attn.kv_cache)
    return DecoderLayer(
        layer.input_layernorm.weight.data_ptr(),
        layer.post_attention_layernorm.weight.data_ptr(),
        layer.input_layernorm.eps,
        _layer_weight(layer.self_attn.qkv_proj),
        _layer_weight(layer.self_attn.o_proj),
        _layer_weight(layer.mlp.gate_up_proj),
        _layer_weight(layer.mlp.down_proj),
        keys,
        values,
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_dim,
        attn.kv_cache.shape[2],
        attn.scale,
        KV_FORMATS[attn.kv_cache.dtype],
    )
