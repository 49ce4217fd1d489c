"""benchmarks/serve.py end to end against the live server (tiny levels)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.mark.slow
def test_serve_benchmark_reports_levels(server, tmp_path: Path) -> None:
    output = tmp_path / "serve.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--url",
            server.api_url,
            "--api-key",
            "test-key",
            "--concurrency",
            "1,2",
            "--num-requests",
            "1,2",
            "--max-tokens",
            "3",
            "--prompt-words",
            "20",
            "--json",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "out tok/s" in result.stdout
    levels = json.loads(output.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["num_failed"] == 0 and level["output_tokens"] == 3 * level["num_requests"]
        assert level["output_tok_s"] > 0 and set(level["ttft_ms"]) == {"p50", "p99", "mean"}
