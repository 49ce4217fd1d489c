"""Safetensors checkpoints in Hugging Face layout, read lazily one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: those the index names when there is one, else every *.safetensors but
    Mistral's own-format copy (consolidated.safetensors) beside HF-format files."""
    index_file = model_dir / SAFETENSORS_INDEX
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        hf_files = [f for f in files if not f.name.startswith("consolidated")]
        files = hf_files or files
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}: convert the checkpoint to safetensors "
            "(e.g. save_pretrained(..., safe_serialization=True)) or pass a .gguf file"
        )
    return files


def count_safetensors_tensors(model_dir: Path) -> int:
    total = 0
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            total += len(shard.keys())
    return total


def iter_safetensors_weights(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its own (HF) name, floating-point ones converted to `dtype`."""
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = shard.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
