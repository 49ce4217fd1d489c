from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenmill.loader import iter_weights, resolve_model


@pytest.mark.parametrize(("arch", "has_lm_head"), [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_directory_weights_have_hf_names(
    tiny_model_dir: Callable[[str], Path], arch: str, has_lm_head: bool
) -> None:
    weights = dict(iter_weights(resolve_model(str(tiny_model_dir(arch))), torch.bfloat16))
    assert ("lm_head.weight" in weights) is has_lm_head
    assert weights["model.embed_tokens.weight"].shape == (49152, 64)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    layer = "model.layers.1.self_attn"
    assert (f"{layer}.q_proj.bias" in weights) is (arch == "qwen2")
    assert (f"{layer}.q_norm.weight" in weights) is (arch == "qwen3")


def test_gguf_weights_have_hf_names(smollm2_gguf: Path) -> None:
    weights = iter_weights(resolve_model(str(smollm2_gguf)), torch.float32)
    name, embedding = next(weights)
    assert name == "model.embed_tokens.weight"
    assert embedding.shape == (49152, 576)
    names = {name for name, _ in weights}
    assert "model.layers.29.self_attn.k_proj.weight" in names
    assert "model.norm.weight" in names
