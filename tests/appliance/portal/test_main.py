"""`tokenmill-appliance portal` as a real process: start-up, login line, portal.yaml, clean stop."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tokenmill_appliance.portal.main import main

from .conftest import free_port

TOKEN = "process-token-0123456789-wxyz"


def test_bad_portal_config_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TOKENMILL_ROOT", str(tmp_path))
    monkeypatch.setenv("OPEN_BUTTON_TOKEN", TOKEN)
    monkeypatch.setenv("PORTAL_CONFIG", "localhost:1111:x:/:Broken App")
    assert main([]) == 2
    assert "'localhost:1111:x:/:Broken App'" in capsys.readouterr().err


def test_portal_imports_neither_the_engine_nor_torch() -> None:
    code = (
        "import sys, tokenmill_appliance.portal.main\n"
        "bad = [m for m in sys.modules if m in ('torch', 'tokenmill') or m.startswith('tokenmill.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def wait_for_health(url: str, process: subprocess.Popen[str]) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the portal exited"
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within 30 s")


@pytest.mark.slow
def test_portal_process_starts_logs_masked_token_and_stops(tmp_path: Path) -> None:
    portal_port, ui_port = free_port(), free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "TOKENMILL_ROOT": str(tmp_path),
        "OPEN_BUTTON_TOKEN": TOKEN,
        "PORTAL_CONFIG": f"localhost:{portal_port}:{ui_port}:/:Instance Portal",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenmill_appliance.cli", "portal", "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_health(f"https://127.0.0.1:{portal_port}/health", process)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "********wxyz" in output
    assert TOKEN not in output
    assert (tmp_path / "etc/portal.yaml").exists() and (tmp_path / "etc/instance.crt").exists()
