"""PROVISIONING_SCRIPT: when it runs, fetching (local and over HTTP), the program's run and its markers.

The two-boot run under supervisord is in test_boot.py.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenmill_appliance.provisioning import (
    ProvisioningError,
    display_source,
    done_marker,
    download_request,
    fetch_script,
    prepare_provisioning,
    provisioning_command,
)
from tokenmill_appliance.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def settings_for(root: Path, script: str) -> Settings:
    env = {"TOKENMILL_ROOT": str(root), "OPEN_BUTTON_TOKEN": "t" * 16, "PROVISIONING_SCRIPT": script}
    return Settings.from_env(env)


def test_prepare_runs_only_until_a_success(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "/workspace/p.sh")
    assert prepare_provisioning(settings)
    assert settings.provisioning_marker == tmp_path / ".provisioning"
    assert settings.provisioning_marker.exists()
    done_marker(settings).parent.mkdir(parents=True)
    done_marker(settings).write_text("done")
    assert not prepare_provisioning(settings)
    assert not settings.provisioning_marker.exists()


def test_prepare_without_a_script_clears_a_stale_marker(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "")
    settings.provisioning_marker.write_text("left by a boot cut short")
    assert not prepare_provisioning(settings)
    assert not settings.provisioning_marker.exists()


def test_local_paths_resolve_under_the_root_and_the_workspace(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "p.sh").write_text("echo hi\n")
    root = tmp_path / "root"
    (root / "workspace").mkdir(parents=True)
    (root / "workspace/p.sh").write_text("echo hi\n")
    # Under the root; relative to the workspace; already under the root; a file outside the root.
    sources = ("/workspace/p.sh", "p.sh", str(root / "workspace/p.sh"), str(outside / "p.sh"))
    for source in sources:
        script = fetch_script(settings_for(root, source))
        assert script.read_text() == "echo hi\n"
        assert script.stat().st_mode & 0o777 == 0o700
        assert provisioning_command(script) == ["bash", str(script)]
    with pytest.raises(ProvisioningError, match="no such file"):
        fetch_script(settings_for(root, "/workspace/missing.sh"))


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_http(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    url, served = http_dir
    (served / "p.sh").write_text("#!/bin/sh\necho downloaded\n")
    script = fetch_script(settings_for(tmp_path / "root", f"{url}/p.sh"))
    assert "echo downloaded" in script.read_text()
    assert provisioning_command(script) == [str(script)]
    with pytest.raises(ProvisioningError, match="cannot download"):
        fetch_script(settings_for(tmp_path / "root", f"{url}/missing.sh"))


def test_url_credentials_are_sent_as_basic_auth_and_never_shown(
    tmp_path: Path, http_dir: tuple[str, Path]
) -> None:
    url, served = http_dir
    (served / "p.sh").write_text("echo with credentials\n")
    with_credentials = url.replace("http://", "http://user:SECRETPW@") + "/p.sh"
    assert (
        "echo with credentials" in fetch_script(settings_for(tmp_path / "root", with_credentials)).read_text()
    )
    assert download_request(with_credentials).get_header("Authorization") == "Basic dXNlcjpTRUNSRVRQVw=="
    for malformed in ("https://user:SECRETPW@host:notaport/x.sh", "http://[::1/x.sh"):
        with pytest.raises(ProvisioningError, match="cannot download") as caught:
            fetch_script(settings_for(tmp_path / "root", malformed))
        assert "SECRETPW" not in str(caught.value)


def test_url_credentials_do_not_follow_a_redirect(tmp_path: Path) -> None:
    # 127.0.0.2 (the address asked) redirects to 127.0.0.1 (another host): only the first gets the login.
    seen: dict[str, str | None] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = self.connection.getsockname()[0]
            seen[host] = self.headers.get("Authorization")
            if host == "127.0.0.2":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{servers[1].server_address[1]}/p.sh")
                self.end_headers()
            else:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"echo redirected\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    servers = [http.server.HTTPServer((host, 0), Handler) for host in ("127.0.0.2", "127.0.0.1")]
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        source = f"http://user:SECRETPW@127.0.0.2:{servers[0].server_address[1]}/p.sh"
        assert "echo redirected" in fetch_script(settings_for(tmp_path / "root", source)).read_text()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert seen == {"127.0.0.2": "Basic dXNlcjpTRUNSRVRQVw==", "127.0.0.1": None}


def run_program(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env |= {"TOKENMILL_ROOT": str(root), "PROVISIONING_SCRIPT": script, "OPEN_BUTTON_TOKEN": "t" * 16}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "tokenmill_appliance.cli", "program", "provisioning"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_program_success_marks_done_and_logs(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "p.sh").write_text(
        'echo "in $(pwd)"; test -e "$TOKENMILL_ROOT/.provisioning" && echo marker-present\n'
    )
    settings = settings_for(tmp_path, "/workspace/p.sh")
    assert prepare_provisioning(settings)
    result = run_program(tmp_path, "/workspace/p.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "var/log/portal/provisioning.log").read_text()
    assert f"in {workspace}" in log and "marker-present" in log and "provisioning succeeded" in log
    assert not settings.provisioning_marker.exists()
    assert done_marker(settings).exists()


@pytest.mark.parametrize("script", ["/workspace/fails.sh", "/workspace/missing.sh"])
def test_program_failure_is_logged_and_clears_the_marker(tmp_path: Path, script: str) -> None:
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace/fails.sh").write_text("echo trying; exit 3\n")
    settings = settings_for(tmp_path, script)
    assert prepare_provisioning(settings)
    result = run_program(tmp_path, script)
    assert result.returncode == 1
    log = (tmp_path / "var/log/portal/provisioning.log").read_text()
    assert "provisioning failed" in log
    assert not settings.provisioning_marker.exists()
    assert not done_marker(settings).exists()
    assert prepare_provisioning(settings), "a failed script runs again at the next boot"


def test_logs_never_show_url_credentials_or_query() -> None:
    assert (
        display_source("https://u:pw@example.com:8443/p.sh?token=abc") == "https://example.com:8443/p.sh?..."
    )
    assert display_source("/workspace/p.sh") == "/workspace/p.sh"
