"""benchmarks/gpu_check.py, the device run's one script, in its CPU smoke mode: every check it can run
here goes through without an ERROR row, and the table comes last. (On CPU its numbers mean nothing.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

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
        "3 nano-vllm workload",
        "4 batch-1 decode, CUDA graphs",
        "5 batch-1 decode, --enforce-eager",
    ]
    assert rows["2 greedy vs transformers (float32)"] == "PASS"
    assert "ERROR" not in rows.values()
