from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

from tokenmill.loader import ModelSource, iter_weights
from tokenmill.loader.gguf_loader import (
    gguf_eos_token_ids,
    hf_tensor_names,
    iter_gguf_weights,
    unpermute_rotary_rows,
)


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's Q/K rows."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(model_dir: Path, gguf_file: Path, tensor_type: type = np.float32) -> None:
    """Convert a tiny HF checkpoint to GGUF the way llama.cpp does (names, and Llama's Q/K permutation)."""
    config = AutoConfig.from_pretrained(model_dir)
    gguf_names = {hf: gguf for gguf, hf in hf_tensor_names(config.num_hidden_layers).items()}
    writer = GGUFWriter(gguf_file, config.model_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_eos_token_id(config.eos_token_id)
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        module, _, suffix = name.rpartition(".")
        if config.model_type == "llama" and module.endswith("q_proj"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif config.model_type == "llama" and module.endswith("k_proj"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_names[module]}.{suffix}", tensor.numpy().astype(tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_smollm2_weights_equal_transformers_gguf_load(smollm2_gguf: Path, smollm2_hf_dir: Path) -> None:
    source = ModelSource(name="smollm2", path=smollm2_gguf.parent, gguf_file=smollm2_gguf)
    names = set()
    with safe_open(smollm2_hf_dir / "model.safetensors", framework="pt") as reference:
        for name, weight in iter_weights(source, torch.float32):
            names.add(name)
            assert weight.dtype == torch.float32
            assert torch.equal(weight, reference.get_tensor(name)), name
        assert names == set(reference.keys())
    assert "lm_head.weight" not in names  # tied to model.embed_tokens.weight


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(weight, 8), 8), weight)
    assert not torch.equal(llama_cpp_permute(weight, 8), weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_round_trip_through_gguf(tiny_model_dir: Callable[[str], Path], tmp_path: Path, arch: str) -> None:
    model_dir = tiny_model_dir(arch)
    write_gguf(model_dir, tmp_path / "tiny.gguf")
    expected = load_file(model_dir / "model.safetensors")
    weights = dict(iter_gguf_weights(tmp_path / "tiny.gguf", torch.float32))
    assert weights.keys() == expected.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=0, msg=name)


def test_float16_tensors_convert_to_the_compute_dtype(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tiny_model_dir("qwen3")
    write_gguf(model_dir, tmp_path / "tiny-f16.gguf", tensor_type=np.float16)
    expected = load_file(model_dir / "model.safetensors")
    for name, weight in iter_gguf_weights(tmp_path / "tiny-f16.gguf", torch.bfloat16):
        assert weight.dtype == torch.bfloat16
        torch.testing.assert_close(weight, expected[name].to(torch.bfloat16), rtol=1e-2, atol=1e-3, msg=name)


def test_unsupported_architecture(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "other.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' .* is not supported"):
        next(iter_gguf_weights(tmp_path / "other.gguf", torch.float32))


def test_eos_token_ids(smollm2_gguf: Path) -> None:
    assert gguf_eos_token_ids(smollm2_gguf) == frozenset({2})
