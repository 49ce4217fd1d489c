"""`tokenmill bench serve` (tokenmill/benchmarks/serve.py): the repository's benchmarks/serve.py end to end
against the live server of this folder (tiny levels), and its request accounting on scripted streams."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.benchmarks import serve as serve_benchmark

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


@pytest.mark.slow
def test_serve_benchmark_launches_the_server_and_measures_it(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    output = tmp_path / "serve.json"
    serve = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port)]
    command = shlex.join([*serve, "--max-model-len", "512", "--kv-cache-memory", "256MiB"])
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--url", f"http://127.0.0.1:{port}/v1", "--launch", command]
        + ["--concurrency", "2", "--num-requests", "2", "--max-tokens", "3", "--prompt-words", "10"]
        + ["--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert 0 < report["ready_s"] < 300
    # The engine core is a child process holding the weights: the tree's RSS is far above one interpreter.
    assert report["peak_rss_bytes"] > 500e6
    assert 500e6 < report["peak_pss_bytes"] <= report["peak_rss_bytes"]
    assert "server processes at peak: RSS" in result.stdout
    with pytest.raises(ConnectionRefusedError):  # the server was stopped
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serve_benchmark_reports_a_server_that_exits(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--url", "http://127.0.0.1:9/v1", "--launch", "false"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "exited with code 1 before it was ready" in result.stderr
    missing = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--url",
            "http://127.0.0.1:9/v1",
            "--launch",
            "/nonexistent/llama-server",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1 and "cannot start" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_serve_benchmark_waits_for_a_server_still_loading(tmp_path: Path) -> None:
    """Pointed at a server that listens but answers /health 503 while its model loads, the benchmark waits
    for 200 instead of failing every request with 503."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    serve = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port)]
    server = subprocess.Popen([*serve, "--max-model-len", "512", "--kv-cache-memory", "256MiB"])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # listening: the API answers before the model is loaded
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        result = subprocess.run(
            [sys.executable, str(BENCHMARK), "--url", f"http://127.0.0.1:{port}/v1"]
            + ["--concurrency", "1", "--num-requests", "1", "--max-tokens", "3", "--prompt-words", "10"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "waiting for /health 200" in result.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_serve_benchmark_takes_the_key_from_the_environment_and_names_a_wrong_one(server) -> None:
    def run(*args: str, key: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(BENCHMARK), "--url", server.api_url, "--concurrency", "1", *args]
        command += ["--max-tokens", "2", "--prompt-words", "5"]
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "TOKENMILL_API_KEY")}
        return subprocess.run(
            command,
            env={**env, "VLLM_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    wrong = run(key="wrong")
    assert wrong.returncode == 1 and "rejected the API key" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    # --concurrency alone: its level's default request count (8 for level 1), the key from VLLM_API_KEY.
    right = run(key="test-key")
    assert right.returncode == 0, right.stderr
    assert "out tok/s" in right.stdout


class ScriptedStream:
    """The openai client's completions stream, scripted: each step's text and, last, the usage (or none).
    It stands for servers that behave unlike tokenmill (none of which runs here)."""

    def __init__(self, texts: list[str], completion_tokens: int | None) -> None:
        chunks = [SimpleNamespace(choices=[SimpleNamespace(text=t)], usage=None) for t in texts]
        if completion_tokens is not None:
            chunks.append(
                SimpleNamespace(choices=[], usage=SimpleNamespace(completion_tokens=completion_tokens))
            )
        self.completions = SimpleNamespace(create=self.create)
        self.chunks = chunks
        self.requests: list[dict[str, Any]] = []

    async def create(self, **kwargs: Any) -> Any:
        self.requests.append(kwargs)

        async def stream() -> Any:
            for chunk in self.chunks:
                yield chunk

        return stream()


def test_a_request_cut_short_of_max_tokens_is_failed_not_measured() -> None:
    # A server that ignores ignore_eos stops early: it would be measured on less work than the others.
    short = asyncio.run(serve_benchmark.one_request(ScriptedStream(["a", "b"], 2), "m", "p", 8))
    assert not short.ok and "finished after 2 of 8 tokens" in short.error and "ignore_eos" in short.error
    full = asyncio.run(serve_benchmark.one_request(ScriptedStream(["a"] * 8, 8), "m", "p", 8))
    assert full.ok and full.output_tokens == 8 and not full.counted_chunks


def test_without_usage_tokens_are_counted_as_chunks_and_the_level_says_so() -> None:
    client = ScriptedStream(["ab", "cd", "ef", "gh"], None)  # two tokens a chunk, no usage chunk
    level = asyncio.run(serve_benchmark.run_level(client, "m", ["p", "q"], 2, 8))
    assert level.num_failed == 0 and level.output_tokens == 8  # 4 chunks each: a count it cannot trust
    assert level.warnings == [serve_benchmark.NO_USAGE_WARNING]


def test_requests_are_greedy_unless_a_temperature_is_given() -> None:
    client = ScriptedStream(["a"] * 4, 4)
    asyncio.run(serve_benchmark.run_level(client, "m", ["p"], 1, 4))
    asyncio.run(serve_benchmark.run_level(client, "m", ["p"], 1, 4, temperature=0.8))
    assert [r["temperature"] for r in client.requests] == [0.0, 0.8]
    assert serve_benchmark.parse_args(["--temperature", "0.8"]).temperature == 0.8


def test_vllms_bench_serve_flags_mean_the_same() -> None:
    vllm_flags = ["--base-url", "http://gpu-box:18000", "--max-concurrency", "4", "--num-prompts", "12"]
    args = serve_benchmark.parse_args([*vllm_flags, "--random-output-len", "7"])
    assert (args.concurrency, args.num_requests, args.max_tokens) == ([4], [12], 7)
    assert serve_benchmark.api_url(args.url) == "http://gpu-box:18000/v1"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "--concurrency needs counts of at least 1"),
        (["--concurrency", "2", "--num-requests", "0"], "--num-requests needs counts of at least 1"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_counts_below_one_are_refused_by_name(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_benchmark.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
