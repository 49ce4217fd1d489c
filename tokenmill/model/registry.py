"""Maps a transformers config to our implementation of its architecture."""

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.qwen2 import Qwen2ForCausalLM
from tokenmill.model.qwen3 import Qwen3ForCausalLM


class CausalLM(Protocol):
    """What the runner needs of a model (all of ours are nn.Modules with these methods)."""

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor: ...  # [num_tokens, hidden_size]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [num_rows, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]: ...

    def parameters(self) -> Iterable[nn.Parameter]: ...

    def modules(self) -> Iterable[nn.Module]: ...


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
