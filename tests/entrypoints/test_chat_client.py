"""`tokenmill chat` and `tokenmill complete` as users run them, against the live server."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from unittest import mock

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


def test_the_portals_starting_up_page_is_one_clear_line() -> None:
    """Behind the appliance's portal, a server that is still loading answers with its 502 page."""
    from tokenmill_appliance.portal.proxy import PLACEHOLDER_HTML

    class Placeholder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PLACEHOLDER_HTML.encode()
            self.send_response(502)
            self.send_header("X-Portal-Placeholder", "true")
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Placeholder) as portal:
        threading.Thread(target=portal.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{portal.server_address[1]}/v1"
        result = tokenmill("chat", "--url", url, "-q", "hi", timeout=120)
        portal.shutdown()
    assert result.returncode == 1 and "not ready yet (502 from the portal)" in result.stderr
    assert "<html" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_refused_line_is_reported_and_the_session_goes_on(server) -> None:
    args = ("--url", server.api_url, "--api-key", API_KEY, "--max-tokens", "0")
    result = tokenmill("chat", *args, stdin="hi\nand again\n")
    assert result.returncode == 0 and result.stdout.count("> ") == 3, result.stderr
    assert result.stderr.count("the server answered 400") == 2 and "Traceback" not in result.stderr
    quick = tokenmill("complete", *args, "-q", "Once")  # 0 is 0 here too, not the default 64
    assert quick.returncode == 1 and "the server answered 400" in quick.stderr


def test_an_error_mid_stream_is_one_line_and_leaves_no_unanswered_message() -> None:
    import argparse

    import httpx
    import openai

    from tokenmill.entrypoints.chat_client import ChatSession, describe, interact

    def failing_stream() -> Iterator[object]:
        raise openai.APIError("the engine core process exited", httpx.Request("POST", "http://x"), body=None)
        yield

    class Client:
        class chat:  # noqa: N801 - the SDK's attribute path
            class completions:  # noqa: N801
                create = staticmethod(lambda **kwargs: failing_stream())

    args = argparse.Namespace(max_tokens=4, system_prompt=None)
    session = ChatSession(Client(), "m", args)
    errors: list[str] = []
    with mock.patch("builtins.input", side_effect=["hi", EOFError]):
        assert interact(session.send, on_error=lambda err: errors.append(describe(err))) == 0
    assert errors == ["the server reported an error: the engine core process exited"]
    assert session.messages == []
