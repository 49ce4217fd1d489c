"""Llama family (Llama 2/3, SmolLM2, Mistral, R1-Distill-Llama); Qwen2 and Qwen3 reuse its blocks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.attention import Attention
from tokenmill.model.layers.embedding import LMHead, VocabEmbedding
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tokenmill.model.layers.rotary import RotaryEmbedding, RotaryTables, apply_rotary, rope_parameters
from tokenmill.model.parameters import ParameterSlots

if TYPE_CHECKING:
    from tokenmill.model.fused_decode import FusedDecode

# checkpoint name fragment -> (our fused parameter's fragment, shard id)
STACKED_PARAMS: dict[str, tuple[str, str | int]] = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class LayerOptions:
    """Where a family's decoder layers differ from plain Llama's: biases and q/k norms."""

    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, options: LayerOptions) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=options.qkv_bias
        )
        self.o_proj = RowParallelLinear(
            self.num_heads * self.head_dim, config.hidden_size, bias=options.o_proj_bias
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None

    def forward(self, rope: RotaryTables, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qkv.split([q_size, kv_size, kv_size], dim=-1)[:2]
            q = apply_rotary(self.q_norm(q.view(-1, num_heads, head_dim)), rope)
            k = apply_rotary(self.k_norm(k.view(-1, num_kv_heads, head_dim)), rope)
        else:  # queries and keys rotate in one pass
            qk = apply_rotary(qkv[:, : q_size + kv_size].view(-1, num_heads + num_kv_heads, head_dim), rope)
            q, k = qk[:, :num_heads], qk[:, num_heads:]
        return self.o_proj(self.attn(q, k, v, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, bias: bool = False) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, options: LayerOptions) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, options)
        self.mlp = LlamaMLP(config, bias=options.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: RotaryTables,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    # int8 models on CPU: decode-only steps in one C call per layer (set by model/fused_decode.py)
    fused_decode: FusedDecode | None = None

    def __init__(self, config: Any, options: LayerOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers (8 MB per copy at 8k positions and head_dim 128), looked up once
        # per step.
        rope = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, rope)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, options) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        rope = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual: torch.Tensor | None = None
        if self.fused_decode is not None and self.fused_decode.applies(hidden, metadata):
            hidden, residual = self.fused_decode(hidden, rope, metadata)  # one C call per layer
        else:
            for layer in self.layers:
                hidden, residual = layer(rope, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_options(config))
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied)

    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        # As transformers' LlamaAttention and LlamaMLP (Mistral's configs have neither field).
        attention_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        return LayerOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias, mlp_bias=mlp_bias)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)  # [num_tokens, hidden_size]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [num_rows, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads checkpoint tensors by their Hugging Face names; returns the parameters filled."""
        names = {name for name, _ in self.named_parameters(remove_duplicate=False)}
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        slots = ParameterSlots(self)
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue
            target, shard_id = stacked_target(name)
            if target not in names:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            param = self.get_parameter(target)
            if shard_id is None:
                slots.assign(target, tensor)  # the loaded tensor becomes the parameter
            else:  # one shard of a fused parameter, allocated with its first shard
                if param.is_meta:
                    empty = torch.empty(param.shape, dtype=tensor.dtype, device=tensor.device)
                    param = slots.assign(target, empty)
                param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
            loaded.add(target)
        if tied:
            loaded.add("lm_head.weight")
        return loaded


def stacked_target(name: str) -> tuple[str, str | int | None]:
    for fragment, (fused, shard_id) in STACKED_PARAMS.items():
        if fragment in name:
            return name.replace(fragment, fused), shard_id
    return name, None
