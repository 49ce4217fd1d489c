from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors import safe_open
from safetensors.torch import load_file

from tokenmill.loader import ModelSource, iter_weights
from tokenmill.loader.gguf_loader import (
    count_gguf_tensors,
    gguf_eos_token_ids,
    iter_gguf_weights,
    unpermute_rotary_rows,
)


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


def test_unpermute_restores_hf_rotary_halves() -> None:
    # One head of head_dim 4: GGML rotates adjacent pairs (rows x0 y0 | x1 y1), HF the halves (x0 x1 | y0 y1).
    ggml_rows = torch.tensor([[0.0], [10.0], [1.0], [11.0], [2.0], [12.0], [3.0], [13.0]])
    hf_rows = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])
    assert torch.equal(unpermute_rotary_rows(ggml_rows, num_heads=1), hf_rows)
    two_heads = unpermute_rotary_rows(torch.cat([ggml_rows, ggml_rows + 100]), num_heads=2)
    assert torch.equal(two_heads, torch.cat([hf_rows, hf_rows + 100]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_round_trip_through_gguf(
    tiny_model_dir: Callable[[str], Path], tiny_gguf: Callable[..., Path], arch: str
) -> None:
    expected = load_file(tiny_model_dir(arch) / "model.safetensors")
    weights = dict(iter_gguf_weights(tiny_gguf(arch), torch.float32))
    assert weights.keys() == expected.keys()
    for name, weight in weights.items():
        assert torch.equal(weight, expected[name]), name


def test_float16_tensors_convert_to_the_compute_dtype(
    tiny_model_dir: Callable[[str], Path], tiny_gguf: Callable[..., Path]
) -> None:
    expected = load_file(tiny_model_dir("qwen3") / "model.safetensors")
    for name, weight in iter_gguf_weights(tiny_gguf("qwen3", "float16"), torch.bfloat16):
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


def test_rope_frequency_factors_are_skipped(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "llama3.gguf", "llama")
    writer.add_block_count(0)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((4, 2), dtype=np.float32))
    writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert count_gguf_tensors(tmp_path / "llama3.gguf") == 1
    weights = dict(iter_gguf_weights(tmp_path / "llama3.gguf", torch.float32))
    assert list(weights) == ["model.embed_tokens.weight"]
    assert torch.equal(weights["model.embed_tokens.weight"], torch.ones(4, 2))


def test_eos_token_ids(smollm2_gguf: Path) -> None:
    assert gguf_eos_token_ids(smollm2_gguf) == frozenset({2})


@pytest.mark.parametrize("quant_type", ["Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_quantized_tensors_dequantize_like_gguf(tmp_path: Path, quant_type: str) -> None:
    # Q5_0/Q5_1 are block types transformers' fast header reader cannot size: gguf's reader reads those.
    qtype = GGMLQuantizationType[quant_type]
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    blocks = quants.quantize(weight, qtype)
    path = tmp_path / f"{quant_type}.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(0)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights = dict(iter_gguf_weights(path, torch.float32))
    expected = torch.from_numpy(quants.dequantize(blocks, qtype))
    assert torch.equal(weights["model.embed_tokens.weight"], expected)
    assert (weights["model.embed_tokens.weight"] - torch.from_numpy(weight)).abs().max() < 0.2
