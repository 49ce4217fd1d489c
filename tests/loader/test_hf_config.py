import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tokenmill.loader import ModelSource, load_hf_config, resolve_model, sliding_window
from tokenmill.loader.gguf_config import llama3_rope_scaling


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_directory_config(tiny_model_dir: Callable[[str], Path], arch: str, tied: bool) -> None:
    config = load_hf_config(resolve_model(str(tiny_model_dir(arch))))
    assert config.model_type == arch
    assert config.tie_word_embeddings is tied
    assert config.vocab_size == 49152
    assert config.num_key_value_heads == 2


def test_overrides_replace_fields(tiny_model_dir: Callable[[str], Path]) -> None:
    source = resolve_model(str(tiny_model_dir("qwen3")))
    config = load_hf_config(source, overrides={"max_position_embeddings": 512})
    assert config.max_position_embeddings == 512
    assert config.head_dim == 32


def test_gguf_config_from_metadata(smollm2_gguf: Path) -> None:
    config = load_hf_config(resolve_model(str(smollm2_gguf)))
    assert config.model_type == "llama"
    assert config.tie_word_embeddings is True  # the GGUF has no output.weight
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.eos_token_id == 2


def test_gguf_config_equals_transformers_own(smollm2_gguf: Path) -> None:
    ours = load_hf_config(resolve_model(str(smollm2_gguf))).to_dict()
    reference = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).to_dict()
    names = ("_name_or_path", "_model_name_or_path")
    assert {k: v for k, v in ours.items() if k not in names} == {
        k: v for k, v in reference.items() if k not in names
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_config_round_trip(
    tiny_model_dir: Callable[[str], Path], tiny_gguf: Callable[..., Path], arch: str
) -> None:
    expected = load_hf_config(resolve_model(str(tiny_model_dir(arch))))
    config = load_hf_config(resolve_model(str(tiny_gguf(arch))))
    assert type(config) is type(expected)
    fields = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]
    assert {f: getattr(config, f, None) for f in fields} == {f: getattr(expected, f, None) for f in fields}
    assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)


def test_gguf_config_is_a_fresh_copy(smollm2_gguf: Path) -> None:
    source = resolve_model(str(smollm2_gguf))
    load_hf_config(source, overrides={"max_position_embeddings": 64})
    assert load_hf_config(source).max_position_embeddings == 8192


def test_mistral_converted_as_llama(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "mistral.gguf", "llama")
    writer.add_name("Mistral 7B Instruct v0.3")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_vocab_size(4)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = load_hf_config(ModelSource(name="m", path=tmp_path, gguf_file=tmp_path / "mistral.gguf"))
    assert config.model_type == "mistral"
    assert config.sliding_window is None  # llama.cpp attends to the whole context
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (8, 1, 4)
    assert config.tie_word_embeddings is True


def llama_cpp_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for a Llama 3.1 rope scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    factors = []
    for frequency in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def hf_inverse_frequencies(theta: float, head_dim: int, scaling: dict) -> torch.Tensor:
    # rope_theta and rope_scaling go through **kwargs: transformers 5 folds them into rope_parameters.
    rope: dict[str, Any] = {"rope_theta": theta, "rope_scaling": scaling}
    config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=131072, **rope
    )
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


LLAMA_3_1 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_llama3_rope_scaling_from_frequency_factors() -> None:
    factors = llama_cpp_rope_factors(500000.0, 128, LLAMA_3_1)
    assert llama3_rope_scaling(factors.astype(np.float64), 500000.0) == LLAMA_3_1


def test_llama3_rope_scaling_gives_hf_frequencies_for_other_parameters() -> None:
    # low_freq_factor is not recoverable on its own; the frequencies transformers computes are.
    scaling = {**LLAMA_3_1, "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}
    factors = llama_cpp_rope_factors(500000.0, 64, scaling)
    recovered = llama3_rope_scaling(factors.astype(np.float64), 500000.0)
    assert recovered is not None
    torch.testing.assert_close(
        hf_inverse_frequencies(500000.0, 64, recovered), hf_inverse_frequencies(500000.0, 64, scaling)
    )


def test_gguf_with_rope_frequency_factors(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "llama3.gguf", "llama")
    writer.add_block_count(1)
    writer.add_context_length(131072)
    writer.add_embedding_length(256)
    writer.add_head_count(2)
    writer.add_rope_freq_base(500000.0)
    writer.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float32))
    writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(500000.0, 128, LLAMA_3_1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = load_hf_config(ModelSource(name="m", path=tmp_path, gguf_file=tmp_path / "llama3.gguf"))
    assert config.rope_parameters == {**LLAMA_3_1, "rope_theta": 500000.0}


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = ModelSource(name="gpt2", path=tmp_path, gguf_file=tmp_path / "gpt2.gguf")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' .* is not supported"):
        load_hf_config(source)


@pytest.mark.parametrize(
    ("config", "window"),
    [
        (LlamaConfig(), None),
        (MistralConfig(sliding_window=8), 8),
        (MistralConfig(sliding_window=None), None),
        # Qwen2/Qwen3 configs carry a window that applies only with use_sliding_window, in the layers from
        # max_window_layers on.
        (Qwen2Config(sliding_window=8, use_sliding_window=False), None),
        (
            Qwen2Config(sliding_window=8, use_sliding_window=True, num_hidden_layers=2, max_window_layers=2),
            None,
        ),
        (Qwen2Config(sliding_window=8, use_sliding_window=True, num_hidden_layers=2, max_window_layers=1), 8),
        (Qwen3Config(sliding_window=8, use_sliding_window=True, num_hidden_layers=2, max_window_layers=0), 8),
        # A config class that keeps the window it does not use (transformers 4.x's Qwen2Config).
        (PretrainedConfig(sliding_window=8, use_sliding_window=False), None),
    ],
)
def test_sliding_window_as_transformers_applies_it(config: PretrainedConfig, window: int | None) -> None:
    assert sliding_window(config) == window
