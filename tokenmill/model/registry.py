"""Maps a transformers config to our implementation of its architecture."""

from typing import Any

from torch import nn

from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.qwen2 import Qwen2ForCausalLM
from tokenmill.model.qwen3 import Qwen3ForCausalLM

MODELS_BY_TYPE: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def get_model_class(config: Any) -> type[nn.Module]:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODELS_BY_TYPE:
        supported = ", ".join(sorted(MODELS_BY_TYPE))
        raise ValueError(f"model type {model_type!r} is not supported by tokenmill (supported: {supported})")
    return MODELS_BY_TYPE[model_type]
