"""A GGUF file's metadata as Hugging Face transformers config fields (llama.cpp's conventions).

Apart from `hf_config` so that safetensors models load without the `gguf` package.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES
from gguf.quants import dequantize
from transformers import AutoConfig, PretrainedConfig

from tokenmill.loader.gguf_loader import gguf_architecture, gguf_metadata, read_gguf

logger = logging.getLogger(__name__)

# `{architecture}.<key>` GGUF metadata -> transformers config field (llama.cpp's GGUF conventions).
_GGUF_CONFIG_FIELDS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    # Absent when it is hidden_size / num_attention_heads (the config's own default); Qwen3 sets it.
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_GGUF_TOKEN_ID_FIELDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def gguf_config_fields(gguf_file: Path) -> dict[str, Any]:
    """The transformers config fields a GGUF's metadata gives (model_type included)."""
    architecture = gguf_architecture(gguf_file)
    # llama.cpp converts Mistral as "llama"; transformers tells them apart by name, and so do we.
    model_name = str(gguf_metadata(gguf_file, "general.name", "")).lower()
    model_type = "mistral" if architecture == "llama" and "mistral" in model_name else architecture
    contents = read_gguf(gguf_file)
    output_weight = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}.weight"
    fields: dict[str, Any] = {
        "model_type": model_type,
        "tie_word_embeddings": all(tensor.name != output_weight for tensor in contents.tensors),
    }
    if model_type == "mistral":
        # llama.cpp runs GGUF Mistrals with full attention; MistralConfig would default to a 4096 window.
        fields["sliding_window"] = None
    for key, field in _GGUF_CONFIG_FIELDS.items():
        value = gguf_metadata(gguf_file, f"{architecture}.{key}")
        if value is not None:
            fields[field] = value
    for key, field in _GGUF_TOKEN_ID_FIELDS.items():
        value = gguf_metadata(gguf_file, key)
        if value is not None:
            fields[field] = value
    vocabulary_length = contents.metadata.get("tokenizer.ggml.tokens")  # a string array: its length
    if "vocab_size" not in fields and vocabulary_length is not None:
        fields["vocab_size"] = vocabulary_length
    rope_scaling = gguf_rope_scaling(gguf_file, architecture)
    if rope_scaling is not None:
        fields["rope_scaling"] = rope_scaling
    return fields


def gguf_rope_scaling(gguf_file: Path, architecture: str) -> dict[str, Any] | None:
    """The HF rope scaling of a GGUF: linear from its metadata, llama3 from its rope_freqs tensor."""
    if gguf_metadata(gguf_file, f"{architecture}.rope.scaling.type") == "linear":
        return {
            "rope_type": "linear",
            "factor": float(gguf_metadata(gguf_file, f"{architecture}.rope.scaling.factor")),
        }
    rope_freqs = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"
    for tensor in read_gguf(gguf_file).tensors:
        if tensor.name == rope_freqs:
            theta = float(gguf_metadata(gguf_file, f"{architecture}.rope.freq_base", 10000.0))
            freq_factors = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
            return llama3_rope_scaling(freq_factors, theta)
    return None


def llama3_rope_scaling(freq_factors: np.ndarray, rope_theta: float) -> dict[str, Any] | None:
    """Llama 3.1's rope scaling recovered from llama.cpp's per-frequency factors.

    llama.cpp stores 1 / ((1 - s) / factor + s) per frequency, with s = (original_context / wavelength -
    low_freq_factor) / (high_freq_factor - low_freq_factor) clipped to [0, 1]. In the band 0 < s < 1, s is
    linear in 1 / wavelength: s = a / wavelength + b. Only a and b matter to the result, so fixing
    low_freq_factor = 1 gives high_freq_factor = 1 - 1 / b and original_context = -a / b exactly.
    """
    factor = float(freq_factors.max())
    head_dim = 2 * len(freq_factors)
    inverse_wavelengths = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)
    in_band = (freq_factors > 1 + 1e-4) & (freq_factors < factor - 1e-4)
    if factor <= 1 + 1e-4:
        return None
    if in_band.sum() < 2:
        logger.warning("rope_freqs of this GGUF is not Llama 3 rope scaling; it runs without rope scaling")
        return None
    smooth = (1 / freq_factors[in_band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inverse_wavelengths[in_band], smooth, 1)
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(1 - 1 / intercept), 4),
        "original_max_position_embeddings": round(float(-slope / intercept)),
    }


@lru_cache(maxsize=4)
def cached_gguf_config(gguf_file: Path, mtime_ns: int) -> PretrainedConfig:
    """The config of `gguf_file` (callers deep-copy it); `mtime_ns` keys the cache to the file's version."""
    fields = gguf_config_fields(gguf_file)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
