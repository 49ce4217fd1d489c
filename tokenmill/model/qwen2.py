"""Qwen2 / Qwen2.5: the Llama architecture with biases on the q, k and v projections."""

from typing import Any

from tokenmill.model.llama import LayerOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        return LayerOptions(qkv_bias=True)  # transformers' Qwen2Attention: always, and never on o_proj
