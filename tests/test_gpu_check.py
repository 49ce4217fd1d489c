"""benchmarks/gpu_check.py, the device run's one script, in its CPU smoke mode: every check it can run
here goes through without an ERROR row, and the table comes last. (On CPU its numbers mean nothing.)"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenmill.loader.source import ModelSource

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_smoke_run_prints_every_row_and_the_table_last(
    smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    smollm2_tokenizer.save_pretrained(tmp_path / "tokenizer")
    command = [sys.executable, str(SCRIPT), "--tokenizer", str(tmp_path / "tokenizer"), "--smoke"]
    result = subprocess.run(
        [*command, "--only", "2345", "--time-limit", "600"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.rindex("| check | result | detail |") :].splitlines()[2:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table}
    assert list(rows) == [
        "2 greedy vs transformers (float32)",
        "2 greedy vs transformers (float32, Triton kernels + layer ops + CUDA graphs)",
        "2 greedy vs transformers (bfloat16)",
        "2 no host syncs in a generation",
        "3 nano-vllm workload",
        "4 batch-1 decode, CUDA graphs",
        "5 batch-1 decode, --enforce-eager",
    ]
    assert rows["2 greedy vs transformers (float32)"] == "PASS"
    assert "ERROR" not in rows.values()
    assert "check 4's kernels" in result.stdout  # the profile of a batch-1 generation, above the table


def test_transformers_baseline_splits_its_batch_only_where_its_cache_would_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as the script runs: its check modules are siblings
    gpu_check_speed = importlib.import_module("gpu_check_speed")
    config = gpu_check_speed.qwen3_06b_config(argparse.Namespace(smoke=False))  # 112 KiB of cache a token
    gib = 1 << 30
    size = functools.partial(gpu_check_speed.hf_batch_size, config, 256, 2048, torch.bfloat16)
    assert size(140 * gib) == 256  # an H200: 56 GiB of cache, budgeted twice, fits
    assert size(77 * gib) == 128  # an H100: two batches
    assert size(30 * gib) == 32
    assert size(1 * gib) == 1  # never below one request
    assert gpu_check_speed.hf_batch_size(config, 5, 2048, torch.bfloat16, 77 * gib) == 5


def test_prepare_saves_the_tokenizer_for_the_device_run(smollm2_source: ModelSource, tmp_path: Path) -> None:
    # smollm2_source: the embedded default model, whose tokenizer is saved, is installed (else a skip)
    # A relative DIR (the default, .gpu-check/tokenizer, is one) is the repository's: run from a copy of
    # the script, so that the test writes nothing into the checkout.
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    script.write_bytes(SCRIPT.with_suffix(".sh").read_bytes())
    script.chmod(0o755)
    command = [str(script), "--prepare", "out/tokenizer"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # the device call to make
    assert "command 'benchmarks/gpu_check.sh out/tokenizer', carry ['out']" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert len(tokenizer) == 49152 and tokenizer.chat_template
