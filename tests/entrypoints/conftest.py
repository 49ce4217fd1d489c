"""One live `tokenmill serve` (the default model, on a free loopback port) shared by the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

API_KEY = "test-key"
MODEL = "smol"
MODEL_ALIAS = "smol-alias"
START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 30


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path
    clients: dict[bool, openai.OpenAI] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def http(self, authorized: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"} if authorized else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def client(self, strict: bool = True) -> openai.OpenAI:
        """A shared SDK client (closed with the server); strict validates every response's types."""
        if strict not in self.clients:
            self.clients[strict] = self._new_client(strict)
        return self.clients[strict]

    def _new_client(self, strict: bool) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.api_url,
            api_key=API_KEY,
            max_retries=0,
            timeout=120,
            _strict_response_validation=strict,
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.api_url,
            api_key=API_KEY,
            max_retries=0,
            timeout=120,
            _strict_response_validation=True,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokenmill.entrypoints.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--kv-cache-memory",
        "256MiB",
        "--max-num-seqs",
        "32",
        *extra,
    ]


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"tokenmill serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(
        f"tokenmill serve was not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a supervisor stops it; the engine core process must go with the server."""
    children = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
    for child in alive:
        child.kill()
    assert not alive, f"processes left behind after SIGTERM: {[c.pid for c in alive]}"


def kill_engine_core(process: subprocess.Popen[bytes]) -> None:
    cores = [
        child
        for child in psutil.Process(process.pid).children()
        if "multiprocessing.spawn" in " ".join(child.cmdline())
    ]
    assert len(cores) == 1, cores
    cores[0].kill()


def check_exit_after_core_dies(live: LiveServer) -> None:
    """Last, with no test left to serve: kill the engine core. /health turns 503 and says why; then the
    server stops with exit status 1, so that a supervisor (autorestart=unexpected) starts a fresh one."""
    kill_engine_core(live.process)
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{live.url}/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, "/health stayed 200 after the engine core died"
        time.sleep(0.2)
    assert "exited" in health.json()["error"]["message"]
    assert live.process.wait(60) == 1
    assert "the engine core died" in live.log.read_text()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = serve_command(
        port, "--api-key", API_KEY, "--served-model-name", MODEL, MODEL_ALIAS, "--seed", "0"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "TOKENMILL_API_KEY")}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        live = LiveServer(url, process, log)
        yield live
        for client in live.clients.values():
            client.close()
        check_exit_after_core_dies(live)
    finally:
        stop(process)
