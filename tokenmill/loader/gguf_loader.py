"""GGUF checkpoints: metadata, and tensors dequantized one by one under their Hugging Face names."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor -> Hugging Face transformers module name, for the Llama/Qwen2/Qwen3 family.
_HF_MODULE_NAMES: dict[MODEL_TENSOR, str] = {
    MODEL_TENSOR.TOKEN_EMBD: "model.embed_tokens",
    MODEL_TENSOR.OUTPUT_NORM: "model.norm",
    MODEL_TENSOR.OUTPUT: "lm_head",
    MODEL_TENSOR.ATTN_NORM: "model.layers.{bid}.input_layernorm",
    MODEL_TENSOR.ATTN_Q: "model.layers.{bid}.self_attn.q_proj",
    MODEL_TENSOR.ATTN_K: "model.layers.{bid}.self_attn.k_proj",
    MODEL_TENSOR.ATTN_V: "model.layers.{bid}.self_attn.v_proj",
    MODEL_TENSOR.ATTN_OUT: "model.layers.{bid}.self_attn.o_proj",
    MODEL_TENSOR.ATTN_Q_NORM: "model.layers.{bid}.self_attn.q_norm",
    MODEL_TENSOR.ATTN_K_NORM: "model.layers.{bid}.self_attn.k_norm",
    MODEL_TENSOR.FFN_NORM: "model.layers.{bid}.post_attention_layernorm",
    MODEL_TENSOR.FFN_GATE: "model.layers.{bid}.mlp.gate_proj",
    MODEL_TENSOR.FFN_UP: "model.layers.{bid}.mlp.up_proj",
    MODEL_TENSOR.FFN_DOWN: "model.layers.{bid}.mlp.down_proj",
}
# Llama 3.1+ GGUFs keep llama3 rope scaling as this tensor of frequency factors, not as metadata. HF
# checkpoints have no such weight: the config's rope scaling stands for it (see hf_config.py).
_SKIPPED_TENSORS = frozenset({TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]})


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, as `gguf.quants.dequantize` takes it: `data` is a read-only memory map of
    its bytes, [*rows, bytes per row] (`tensor_type` says how those bytes encode the row's values)."""

    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray


@dataclass(frozen=True)
class GGUFContents:
    """What the loader needs of a GGUF file: its metadata and its tensors, memory-mapped.

    String arrays (the vocabulary, the merges) appear in `metadata` as their lengths: transformers reads
    them itself for the tokenizer. The header is read with transformers' GGUF reader, which walks it in
    ~20 ms; gguf's `GGUFReader` builds a numpy view per vocabulary entry (5 s for a 49k vocabulary).
    """

    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]


def _read_contents(path: str) -> GGUFContents:
    try:
        header = GgufHeader.from_file(path)
    except ValueError as error:
        if "is not supported yet" not in str(error):
            raise
        return _read_contents_with_gguf(path)  # a block type transformers does not size (Q5_0, Q5_1, ...)
    metadata, _ = read_gguf_metadata(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = []
    for info in header.tensors:
        start = header.data_start + info.offset
        num_rows = math.prod(info.shape[:-1])
        data = blob[start : start + info.nbytes].reshape(*info.shape[:-1], info.nbytes // num_rows)
        tensors.append(GGUFTensor(info.name, GGMLQuantizationType(info.ggml_type), data))
    return GGUFContents(metadata, tuple(tensors))


def _read_contents_with_gguf(path: str) -> GGUFContents:
    """The same contents through gguf's complete but slow reader (seconds for a large vocabulary)."""
    reader = GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        is_string_array = field.types[:1] == [GGUFValueType.ARRAY] and field.types[-1] == GGUFValueType.STRING
        metadata[key] = len(field.data) if is_string_array else field.contents()
    tensors = tuple(GGUFTensor(t.name, t.tensor_type, t.data) for t in reader.tensors)
    return GGUFContents(metadata, tensors)


@lru_cache(maxsize=8)
def _cached_contents(path: str, mtime_ns: int) -> GGUFContents:
    return _read_contents(path)


def read_gguf(gguf_file: Path) -> GGUFContents:
    """The contents of `gguf_file`, read once per process and shared by config, eos and weight loading."""
    return _cached_contents(str(gguf_file), gguf_file.stat().st_mtime_ns)


def gguf_metadata(gguf_file: Path, key: str, default: Any = None) -> Any:
    """A metadata value (`general.architecture`, `llama.block_count`, ...), or `default` if absent."""
    return read_gguf(gguf_file).metadata.get(key, default)


def gguf_architecture(gguf_file: Path) -> str:
    architecture = str(gguf_metadata(gguf_file, "general.architecture"))
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
        raise ValueError(
            f"GGUF architecture {architecture!r} of {gguf_file} is not supported (supported: {supported}): "
            "pass a GGUF of a supported architecture or a Hugging Face model directory"
        )
    return architecture


def gguf_eos_token_ids(gguf_file: Path) -> frozenset[int]:
    """The end-of-sequence ids the tokenizer metadata names (eos, and end-of-turn/end-of-message)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    values = (gguf_metadata(gguf_file, key) for key in keys)
    return frozenset(int(value) for value in values if value is not None)


def hf_tensor_names(num_layers: int) -> dict[str, str]:
    """GGUF tensor base names (`blk.3.attn_q`) -> Hugging Face module names."""
    names: dict[str, str] = {}
    for tensor, hf_name in _HF_MODULE_NAMES.items():
        gguf_name = TENSOR_NAMES[tensor]
        if "{bid}" not in gguf_name:
            names[gguf_name] = hf_name
            continue
        for layer in range(num_layers):
            names[gguf_name.format(bid=layer)] = hf_name.format(bid=layer)
    return names


RowsT = TypeVar("RowsT", torch.Tensor, np.ndarray)


def unpermute_rotary_rows(weight: RowsT, num_heads: int) -> RowsT:
    """Undo llama.cpp's Q/K row permutation (its convert script's `permute`) on a tensor or an array of rows
    (values, or a quantized tensor's bytes: each row is moved whole).

    HF Llama rotates the two halves of each head's dims ([x0..x(d/2-1)] with [x(d/2)..]); GGML rotates
    adjacent pairs (x0, x1), so the converter interleaves each head's rows:
    [num_heads, 2, head_dim/2, ...] -> [num_heads, head_dim/2, 2, ...]. This is the inverse.
    """
    head_dim = weight.shape[0] // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def count_gguf_tensors(gguf_file: Path) -> int:
    """How many tensors `iter_gguf_weights` yields."""
    return sum(not _is_skipped(tensor.name) for tensor in read_gguf(gguf_file).tensors)


def _is_skipped(tensor_name: str) -> bool:
    return tensor_name.rpartition(".")[0] in _SKIPPED_TENSORS or tensor_name in _SKIPPED_TENSORS


def iter_gguf_tensors(gguf_file: Path) -> Iterator[tuple[str, GGUFTensor]]:
    """Every tensor of `gguf_file` under its HF name, rows in HF order, as the file stores them (quantized
    tensors stay quantized)."""
    # Its own memory map, not the cached one: the pages it reads are unmapped when loading ends.
    tensors = _read_contents(str(gguf_file)).tensors
    architecture = gguf_architecture(gguf_file)
    num_heads = int(gguf_metadata(gguf_file, f"{architecture}.attention.head_count"))
    num_kv_heads = int(gguf_metadata(gguf_file, f"{architecture}.attention.head_count_kv", num_heads))
    hf_names = hf_tensor_names(int(gguf_metadata(gguf_file, f"{architecture}.block_count")))
    # Only llama.cpp's Llama converter permutes Q/K (Mistral included); Qwen2/Qwen3 keep HF's layout.
    rows_permuted = architecture == "llama"
    for tensor in tensors:
        if _is_skipped(tensor.name):
            continue
        base_name, _, suffix = tensor.name.rpartition(".")
        if base_name not in hf_names:
            raise ValueError(f"GGUF tensor {tensor.name} of {gguf_file} has no Hugging Face equivalent")
        data = tensor.data
        if rows_permuted and base_name.endswith(".attn_q"):
            data = unpermute_rotary_rows(data, num_heads)
        elif rows_permuted and base_name.endswith(".attn_k"):
            data = unpermute_rotary_rows(data, num_kv_heads)
        yield f"{hf_names[base_name]}.{suffix}", GGUFTensor(tensor.name, tensor.tensor_type, data)


def iter_gguf_weights(
    gguf_file: Path, dtype: torch.dtype, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `gguf_file` under its HF name, dequantized to `dtype`, in HF layout; the names in
    `skip` are left out (and never dequantized)."""
    for name, tensor in iter_gguf_tensors(gguf_file):
        if name in skip:
            continue
        array = dequantize(tensor.data, tensor.tensor_type)
        if not array.flags.writeable:  # an unquantized tensor is a view of the read-only memory map
            array = np.array(array)
        yield name, torch.from_numpy(array).to(dtype)
