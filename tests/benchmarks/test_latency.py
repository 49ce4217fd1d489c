"""`tokenmill bench latency` (tokenmill/benchmarks/latency.py): vLLM's latency benchmark, end to end on a tiny
batch; its report's shape; its flags' errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.benchmarks.latency import report

CLI = [sys.executable, "-m", "tokenmill.entrypoints.cli", "bench", "latency"]
TINY = ["--batch-size", "2", "--input-len", "8", "--output-len", "3", "--max-model-len", "128"]


def test_the_command_times_each_batch_and_writes_vllms_json(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    iterations = ["--num-iters-warmup", "1", "--num-iters", "3"]
    command = [*CLI, *TINY, "--n", "2", *iterations, "--output-json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert len(written["latencies"]) == 3 and all(s > 0 for s in written["latencies"])
    assert written["avg_latency"] == pytest.approx(sum(written["latencies"]) / 3)
    assert list(written["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    # 2 prompts x n=2 x 3 tokens a batch.
    assert f"Avg latency: {written['avg_latency']:.4f} seconds (12 output tokens a batch" in result.stdout
    assert not list(tmp_path.glob("*.partial"))


def test_percentiles_lie_between_the_fastest_and_slowest_batch() -> None:
    result = report([3.0, 1.0, 2.0, 4.0])
    assert result["avg_latency"] == 2.5
    assert result["percentiles"]["50"] == 2.5
    assert 1.0 <= result["percentiles"]["10"] <= result["percentiles"]["90"] <= 4.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-iters-warmup", "-1"], "--num-iters-warmup must be at least 0"),
        (["--max-num-seq", "4"], "did you mean --max-num-seqs?"),
        (["--quantization", "fp4"], "unknown quantization 'fp4'"),
    ],
)
def test_bad_flags_exit_with_a_message_before_loading_anything(flags: list[str], message: str) -> None:
    result = subprocess.run([*CLI, *flags], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and "KV cache" not in result.stderr


def test_a_workload_longer_than_the_context_is_refused_with_the_fix() -> None:
    flags = ["--input-len", "300", "--output-len", "4", "--max-model-len", "256", "--num-iters-warmup", "0"]
    result = subprocess.run([*CLI, *flags], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "need a context of 304 tokens, but the engine serves 256" in result.stderr
    assert "raise --max-model-len" in result.stderr
