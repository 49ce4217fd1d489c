"""Qwen3 (dense): the Llama architecture with RMSNorm on each query and key head before rotary."""

from typing import Any

from tokenmill.model.llama import LayerOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        # As transformers' Qwen3Attention: attention_bias on q, k, v and o; never an MLP bias.
        attention_bias = bool(getattr(config, "attention_bias", False))
        return LayerOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias, qk_norm=True)
