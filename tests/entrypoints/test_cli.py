"""The `tokenmill` command itself: help, unknown commands and flags, start-up order, and stopping (a model
that cannot load, a port in use, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tokenmill.entrypoints.cli import main, omp_wait_policy

from .conftest import free_port, kill_engine_core, stop


def tokenmill(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "chat", "complete", "bench", "portal", "boot"))
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_unknown_serve_flag_names_the_closest() -> None:
    result = tokenmill("serve", "--max-num-seq", "4")
    assert result.returncode == 2 and "did you mean --max-num-seqs?" in result.stderr


def test_model_that_cannot_load_stops_the_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tokenmill("serve", "/nonexistent/model.gguf", "--port", str(port))
    assert result.returncode == 1
    assert "/nonexistent/model.gguf" in result.stderr and "Traceback" not in result.stderr


SPAWN_BEFORE_SERVER_IMPORT = """
import sys
from tokenmill.engine.core_client import EngineCoreClient

def spawn(self):
    print("tokenmill.entrypoints.openai.api_server" in sys.modules)
    raise SystemExit(0)

EngineCoreClient.spawn = spawn
from tokenmill.entrypoints.cli import main
main(["serve", "--port", "0"])
"""


def test_serve_spawns_the_engine_core_before_importing_the_server() -> None:
    """The model loads in the core while the API process imports FastAPI and the serving code."""
    result = subprocess.run(
        [sys.executable, "-c", SPAWN_BEFORE_SERVER_IMPORT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_port_in_use_stops_the_server_quietly() -> None:
    """uvicorn's own line says why; the core, spawned before the bind, is stopped without a traceback or
    multiprocessing's "leaked semaphore" warning."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = tokenmill("serve", "--port", str(port), "--quantization", "gguf")
    assert result.returncode != 0
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr


def test_portal_and_boot_are_forwarded_to_the_appliance(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenmill_appliance.cli

    calls: list[list[str]] = []
    monkeypatch.setattr(tokenmill_appliance.cli, "main", lambda argv: calls.append(argv) or 0)
    assert main(["portal", "--flag", "x"]) == 0 and main(["boot"]) == 0
    assert calls == [["portal", "--flag", "x"], ["boot"]]


@pytest.mark.slow
def test_served_engine_core_lets_idle_openmp_threads_sleep(server) -> None:
    # The core shares the cores with the API process (see `tokenmill serve` in cli.py).
    children = psutil.Process(server.process.pid).children()
    (core,) = [child for child in children if any("spawn_main" in part for part in child.cmdline())]
    assert core.environ().get("OMP_WAIT_POLICY") == "PASSIVE"


def test_openmp_wait_policy_follows_the_quantization() -> None:
    assert omp_wait_policy(None) == "PASSIVE"  # float: idle threads sleep, leaving cores to the API
    assert omp_wait_policy("int8") is None  # many short kernel calls: libgomp's spin-then-sleep


def test_serve_args_are_parsed_before_torch_loads() -> None:
    """The wait policy is chosen from the parsed flags; OpenMP reads it once, when torch loads."""
    code = (
        "import sys; from tokenmill.entrypoints.cli_args import parse_serve_args; "
        "parse_serve_args(['--quantization', 'int8']); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_api_server_imports_without_torch_or_transformers() -> None:
    """The core process starts loading the model only once the API server's modules are imported: torch
    and transformers (~3 s on 2 cores) load later, with the tokenizer, while the core loads the model."""
    code = (
        "import sys; import tokenmill.entrypoints.openai.api_server; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["loading", "ready"])
def test_ctrl_c_stops_the_server_without_a_traceback(when: str, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--max-model-len", "2048"], stdout=sink, stderr=sink)
    try:
        wait_until(lambda: the_engine_core_runs(process) if when == "loading" else healthy(port))
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()  # reaped here, not left to warn in a later test
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_a_server_kept_alive_answers_503_after_its_engine_dies(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port)]
    env = {**os.environ, "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--max-model-len", "2048"], stdout=sink, stderr=sink, env=env)
    try:
        wait_until(lambda: healthy(port))
        kill_engine_core(process)
        wait_until(lambda: health_status(port) == 503)
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert "exited" in answer["error"]["message"]
        assert process.poll() is None  # still up, still answering
    finally:
        stop(process)


@pytest.mark.slow
def test_https_and_a_root_path_as_vllm_flags(tmp_path: Path) -> None:
    from tokenmill_appliance.portal.tls import generate_self_signed

    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    generate_self_signed(cert, key, ["127.0.0.1"])
    port = free_port()
    log = tmp_path / "serve.log"
    flags = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--root-path", "/llm"]
    command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), *flags]
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--max-model-len", "2048"], stdout=sink, stderr=sink)
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=10) as client:

            def https_healthy() -> bool:
                try:
                    return client.get(f"{url}/health").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(https_healthy)
            # The API description names the prefix a proxy strips, so /docs works behind it.
            assert client.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/llm"}]
            reply = client.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    finally:
        stop(process)


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def the_engine_core_runs(process: subprocess.Popen[bytes]) -> bool:
    return any("spawn_main" in " ".join(c.cmdline()) for c in psutil.Process(process.pid).children())


def healthy(port: int) -> bool:
    return health_status(port) == 200


def health_status(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_bench_lists_its_benchmarks_and_refuses_others(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("serve", "throughput", "latency"))
    assert main(["bench", "prefix"]) == 2
    assert "unknown benchmark 'prefix'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--help"])
    assert exit_info.value.code == 0 and "tokenmill bench serve" in capsys.readouterr().out
