"""Session-wide fixtures: the embedded default model and tiny random-weight models, built once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenmill.attention.triton_interpret import interpret_without_cuda

# Before transformers: importing it imports triton (through torch._dynamo) where torch is a CUDA build, and
# triton reads TRITON_INTERPRET once, as it is imported.
interpret_without_cuda()

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from tokenmill.loader import load_hf_config
from tokenmill.loader.gguf_loader import hf_tensor_names, read_gguf
from tokenmill.loader.hub import ModelNotFoundError
from tokenmill.loader.source import ModelSource, default_model_source
from tokenmill.tokenizer import load_tokenizer

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
TINY_MODEL_SEED = 0


@pytest.fixture(scope="session")
def smollm2_source() -> ModelSource:
    """The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
    try:
        return default_model_source()
    except ModelNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_source: ModelSource) -> Path:
    """Path of the default model's GGUF file."""
    assert smollm2_source.gguf_file is not None
    return smollm2_source.gguf_file


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source: ModelSource) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer built from the GGUF (vocab 49152, ChatML chat template). Do not mutate it."""
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_hf_dir(
    tmp_path_factory: pytest.TempPathFactory,
    smollm2_source: ModelSource,
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> Path:
    """The default model converted by transformers to an HF safetensors directory (float32, tied
    embeddings, so no lm_head.weight), with its tokenizer and generation config."""
    directory = tmp_path_factory.mktemp("smollm2-hf")
    config = load_hf_config(smollm2_source)
    save_file(transformers_gguf_tensors(smollm2_source, config), directory / "model.safetensors")
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: PreTrainedTokenizerBase
) -> Callable[..., Path]:
    """A factory: `tiny_model_dir(arch, **config_overrides)` for arch in llama, mistral, qwen2, qwen3 is
    the directory of a tiny random-weight model (float32 safetensors + SmolLM2's tokenizer), built once
    per session; `config_overrides` are transformers config fields (attention_bias=True, ...).

    hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), intermediate 128. llama: head_dim 16, untied lm_head;
    mistral: llama's shape, no sliding window unless asked; qwen2: random non-zero q/k/v biases, tied
    embeddings; qwen3: explicit head_dim 32 (not hidden/heads), q/k norms, untied. Norm weights and any
    biases are random, so a model that skips one fails.
    """
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def build(arch: str, **config_overrides: Any) -> Path:
        key = (arch, tuple(sorted(config_overrides.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_tiny_model(arch, directory, smollm2_tokenizer, config_overrides)
            built[key] = directory
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_gguf(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[[str], Path], smollm2_gguf: Path
) -> Callable[..., Path]:
    """A factory: `tiny_gguf(arch, float_type="float32", with_tokenizer=False)` is the tiny model of
    `tiny_model_dir(arch)` converted to one GGUF file the way llama.cpp does (its tensor names, Llama's
    Q/K row permutation; matrices in float32, float16 or a block type: "Q4_0", "Q4_1", "Q8_0").
    `with_tokenizer` copies SmolLM2's tokenizer metadata
    in, making the file a complete model; reading that metadata back costs seconds. Built once per session.
    """
    built: dict[tuple[str, str, bool], Path] = {}

    def build(arch: str, float_type: str = "float32", with_tokenizer: bool = False) -> Path:
        key = (arch, float_type, with_tokenizer)
        if key not in built:
            name = f"tiny-{arch}-{float_type}{'-tokenizer' if with_tokenizer else ''}"
            gguf_file = tmp_path_factory.mktemp(name) / f"{name}.gguf"
            tokenizer_gguf = smollm2_gguf if with_tokenizer else None
            write_tiny_gguf(tiny_model_dir(arch), gguf_file, float_type, tokenizer_gguf)
            built[key] = gguf_file
        return built[key]

    return build


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's Q/K rows (see `unpermute_rotary_rows`)."""
    head_dim = weight.shape[0] // num_heads
    per_head = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)


def write_tiny_gguf(model_dir: Path, gguf_file: Path, matrix_type: str, tokenizer_gguf: Path | None) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    writer = GGUFWriter(gguf_file, config.model_type)
    writer.add_name(f"tiny {config.model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if "head_dim" in config.to_dict():  # llama.cpp writes it where the HF config has one
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    tokenizer_fields = GGUFReader(tokenizer_gguf).fields if tokenizer_gguf is not None else {}
    for key, field in tokenizer_fields.items():
        if key.startswith("tokenizer.") and not key.endswith(("bos_token_id", "eos_token_id")):
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    gguf_names = {hf: gguf for gguf, hf in hf_tensor_names(config.num_hidden_layers).items()}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        module, _, suffix = name.rpartition(".")
        if config.model_type == "llama" and module.endswith("q_proj"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif config.model_type == "llama" and module.endswith("k_proj"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        name = f"{gguf_names[module]}.{suffix}"
        if tensor.dim() == 1:  # llama.cpp keeps norms and biases in float32 whatever the file's type
            writer.add_tensor(name, tensor.numpy().astype(np.float32))
        elif matrix_type in GGMLQuantizationType.__members__:
            block_type = GGMLQuantizationType[matrix_type]
            writer.add_tensor(name, quantize(tensor.numpy(), block_type), raw_dtype=block_type)
        else:
            writer.add_tensor(name, tensor.numpy().astype(np.dtype(matrix_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_gguf_tensors(source: ModelSource, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The float32 state dict transformers' GGUF loading builds: its tensor names and its Q/K
    un-permutation, applied to tensors that `gguf` dequantizes. (`from_pretrained(gguf_file=...)` does the
    same but needs `accelerate`, and re-parses the whole GGUF metadata, which takes long.)"""
    assert source.gguf_file is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    hf_names = get_gguf_hf_weights_map(model, processor)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in read_gguf(source.gguf_file).tensors:
        processed = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name)
        tensors[hf_names[processed.name]] = torch.from_numpy(np.array(processed.weights, dtype=np.float32))
    return tensors


def rope(theta: float) -> dict[str, Any]:
    # transformers 5 reads `rope_theta` into `config.rope_parameters`; 4.x keeps it as an attribute.
    return {"rope_theta": theta}


def tiny_config(
    arch: str, tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None = None
) -> PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        # Wider than the usual 0.02 so logits are spread out and greedy picks are not near-ties.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(overrides or {}),
    )
    if arch == "llama":
        return LlamaConfig(**common, head_dim=16, **rope(10000.0), tie_word_embeddings=False)
    if arch == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common, head_dim=16, **rope(10000.0), tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, **rope(1000000.0), tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, **rope(1000000.0), tie_word_embeddings=False)
    raise ValueError(f"unknown tiny architecture {arch!r}: choose one of {', '.join(TINY_ARCHITECTURES)}")


def save_tiny_model(
    arch: str, directory: Path, tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None = None
) -> None:
    torch.manual_seed(TINY_MODEL_SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (0.0 if name.endswith("bias") else 1.0))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
