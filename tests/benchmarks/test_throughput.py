"""`tokenmill bench throughput` (tokenmill/benchmarks/throughput.py): the offline workload end to end on a
tiny batch, through the command and through the repository's script, and its --backend hf twin."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
TINY = ["--num-requests", "3", "--input-len-range", "8", "16", "--output-len", "4", "--max-model-len", "256"]


def run(command: list[str]) -> dict[str, object]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CLI = [sys.executable, "-m", "tokenmill.entrypoints.cli", "bench", "throughput"]


@pytest.mark.parametrize("backend", ["tokenmill", "hf"])
def test_the_command_reports_the_work_done(backend: str) -> None:
    report = run([*CLI, *TINY, "--backend", backend, "--json"])
    assert (report["backend"], report["num_requests"], report["output_tokens"]) == (backend, 3, 12)
    assert 3 * 8 <= report["prompt_tokens"] <= 3 * 16  # type: ignore[operator]
    assert report["output_tok_s"] > 0  # type: ignore[operator]


def test_the_repository_script_runs_the_same_benchmark() -> None:
    report = run([sys.executable, str(SCRIPT), *TINY, "--json"])
    assert (report["backend"], report["output_tokens"]) == ("tokenmill", 12)


def test_vllms_flags_fix_the_prompt_length_and_write_the_report(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    vllm_flags = ["--num-prompts", "2", "--input-len", "12", "--output-len", "3", "--max-model-len", "128"]
    report = run([*CLI, *vllm_flags, "--output-json", str(out), "--json"])
    assert (report["num_requests"], report["prompt_tokens"], report["output_tokens"]) == (2, 24, 6)
    assert json.loads(out.read_text()) == report


def test_without_json_it_prints_vllms_throughput_line_too() -> None:
    result = subprocess.run([*CLI, *TINY], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("tokenmill (") and "3 requests, " in lines[-2]
    assert re.fullmatch(
        r"Throughput: [0-9.]+ requests/s, [0-9.]+ total tokens/s, [0-9.]+ output tokens/s", lines[-1]
    )
