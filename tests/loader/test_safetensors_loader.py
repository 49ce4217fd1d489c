import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill.loader.safetensors_loader import (
    count_safetensors_tensors,
    iter_safetensors_weights,
    safetensors_files,
)


def test_round_trip(tiny_model_dir: Callable[[str], Path]) -> None:
    model_dir = tiny_model_dir("llama")
    expected = load_file(model_dir / "model.safetensors")
    weights = dict(iter_safetensors_weights(model_dir, torch.float32))
    assert weights.keys() == expected.keys()
    assert count_safetensors_tensors(model_dir) == len(expected)
    for name, weight in weights.items():
        assert torch.equal(weight, expected[name]), name


def test_converts_floats_to_the_compute_dtype_and_keeps_integers(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2, 3), "ids": torch.arange(4)}, tmp_path / "model.safetensors")
    weights = dict(iter_safetensors_weights(tmp_path, torch.bfloat16))
    assert weights["w"].dtype == torch.bfloat16
    assert weights["ids"].dtype == torch.int64


def test_sharded_checkpoint_reads_the_shards_its_index_names(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "model-00002-of-00002.safetensors")
    save_file({"stale": torch.ones(2)}, tmp_path / "consolidated.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [f.name for f in safetensors_files(tmp_path)] == sorted(weight_map.values())
    assert [name for name, _ in iter_safetensors_weights(tmp_path, torch.float32)] == ["a", "b"]


def test_mistral_consolidated_copy_is_ignored_beside_hf_files(tmp_path: Path) -> None:
    save_file({"model.norm.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    save_file({"norm.weight": torch.ones(2)}, tmp_path / "consolidated.safetensors")
    assert safetensors_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights in .*: convert the checkpoint"):
        safetensors_files(tmp_path)
