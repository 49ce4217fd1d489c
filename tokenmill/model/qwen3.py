"""Qwen3 (dense): the Llama architecture with RMSNorm on each query and key head before rotary."""

from tokenmill.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
