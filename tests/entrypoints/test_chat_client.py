"""`tokenmill chat` and `tokenmill complete` as users run them, against the live server."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

API_KEY = "test-key"


def tokenmill(*args: str, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_chat_quick(server) -> None:
    result = tokenmill(
        "chat", "--url", server.api_url, "--api-key", API_KEY, "-q", "hi", "--max-tokens", "16"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Using model: smol" and "".join(lines[1:]).strip()


@pytest.mark.slow
def test_complete_quick(server) -> None:
    result = tokenmill(
        "complete", "--url", server.url, "--api-key", API_KEY, "-q", "Once", "--max-tokens", "6"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Using model: smol" and "".join(lines[1:]).strip()


@pytest.mark.slow
def test_chat_session_keeps_history_and_ends_on_eof(server) -> None:
    result = tokenmill(
        "chat",
        "--url",
        server.api_url,
        "--api-key",
        API_KEY,
        "--model-name",
        "smol-alias",
        "--system-prompt",
        "Answer in one word.",
        "--max-tokens",
        "4",
        stdin="hi\nand again\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Using model: smol-alias\n") and result.stdout.count("> ") == 3


@pytest.mark.slow
def test_wrong_api_key(server) -> None:
    result = tokenmill("chat", "--url", server.api_url, "--api-key", "wrong", "-q", "hi")
    assert result.returncode == 1 and "rejected the API key" in result.stderr


def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tokenmill("complete", "--url", f"http://127.0.0.1:{port}/v1", "-q", "Once", timeout=60)
    assert result.returncode == 1 and "cannot reach a server" in result.stderr
    assert "Traceback" not in result.stderr
