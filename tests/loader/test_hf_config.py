from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from transformers import AutoConfig

from tokenmill.loader import ModelSource, load_hf_config, resolve_model


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
