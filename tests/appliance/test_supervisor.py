"""supervisord.conf generation, checked by running a real supervisord on it under a temp root."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokenmill_appliance.settings import Settings
from tokenmill_appliance.supervisor import (
    PROGRAM_NAMES,
    ProgramConfig,
    SupervisorClient,
    default_programs,
    render_supervisord_conf,
    supervisorctl_argv,
    supervisord_argv,
    write_supervisord_conf,
)


def settings_for(root: Path) -> Settings:
    return Settings.from_env({"TOKENMILL_ROOT": str(root), "OPEN_BUTTON_TOKEN": "t" * 16})


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_conf_has_every_program_under_the_root(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    parser = configparser.RawConfigParser()
    parser.read_string(render_supervisord_conf(settings, default_programs()))
    assert [s.removeprefix("program:") for s in parser.sections() if s.startswith("program:")] == list(
        PROGRAM_NAMES
    )
    assert parser["unix_http_server"]["file"] == str(tmp_path / "var/run/supervisor.sock")
    assert parser["unix_http_server"]["chmod"] == "0700"
    assert "port" not in parser["unix_http_server"] and "inet_http_server" not in parser
    vllm = parser["program:vllm"]
    assert vllm["command"].endswith("-m tokenmill_appliance.cli program vllm")
    assert (vllm["autorestart"], vllm["startsecs"], vllm["stopasgroup"], vllm["killasgroup"]) == (
        "unexpected",
        "0",
        "true",
        "true",
    )
    assert vllm["stdout_logfile"] == str(tmp_path / "var/log/supervisor/vllm.log")


def test_provisioning_program_runs_first_and_once(tmp_path: Path) -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(
        render_supervisord_conf(settings_for(tmp_path), default_programs(include_provisioning=True))
    )
    section = parser["program:provisioning"]
    assert section["autorestart"] == "false"
    assert int(section["priority"]) < min(int(parser[f"program:{n}"]["priority"]) for n in PROGRAM_NAMES)


def test_percent_and_spaces_survive_supervisord_parsing(tmp_path: Path) -> None:
    root = tmp_path / "a dir %(here)s"
    text = render_supervisord_conf(settings_for(root), [ProgramConfig("demo", ["echo", "100%", "two words"])])
    assert "command=echo 100%% 'two words'" in text
    with pytest.raises(ValueError, match="line break"):
        render_supervisord_conf(settings_for(root), [ProgramConfig("demo", ["echo", "a\nb"])])


@pytest.fixture(params=["root", "deep-root"])
def supervisord(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Settings, SupervisorClient]]:
    """A real supervisord on a generated config with small real programs; under the test's temp dir, and
    under a root too deep for the socket's path (it moves to a short one)."""
    root = tmp_path if request.param == "root" else tmp_path / ("deep-" * 16)
    settings = settings_for(root)
    if request.param == "deep-root":
        assert not settings.supervisor_socket.is_relative_to(root)
    ticker = (
        "import itertools, time; [(print('tick', i, flush=True), time.sleep(0.2)) for i in itertools.count()]"
    )
    programs = [
        ProgramConfig("ticker", [sys.executable, "-c", ticker]),
        ProgramConfig(
            "crasher",
            [
                sys.executable,
                "-c",
                "import sys, time; print('boom', flush=True); time.sleep(0.5); sys.exit(4)",
            ],
        ),
        ProgramConfig("quitter", [sys.executable, "-c", "print('nothing to do')"]),
    ]
    assert write_supervisord_conf(settings, programs) == settings.supervisor_conf
    # A program of the user's own, as the vLLM instance image's users add them.
    custom = settings.supervisor_conf.parent / "conf.d" / "custom.conf"
    custom.write_text("[program:custom]\ncommand=sleep 300\nstopsignal=KILL\n")
    out = (tmp_path / "supervisord.out").open("wb")
    proc = subprocess.Popen(
        supervisord_argv(settings),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = SupervisorClient.for_settings(settings)
    try:
        wait_for(lambda: settings.supervisor_socket.exists() or proc.poll() is not None, 60, "the socket")
        assert proc.poll() is None, (tmp_path / "supervisord.out").read_text()
        wait_for(lambda: client.state() == "RUNNING", 60, "supervisord to run")
        yield settings, client
    finally:
        if proc.poll() is None:
            try:
                client.shutdown()
            except OSError:
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        client.close()
        out.close()


@pytest.mark.slow
def test_real_supervisord_runs_the_generated_conf(supervisord: tuple[Settings, SupervisorClient]) -> None:
    settings, client = supervisord
    assert stat.S_IMODE(settings.supervisor_socket.stat().st_mode) == 0o700

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(supervisorctl_argv(settings, *args), capture_output=True, text=True, timeout=60)

    wait_for(lambda: client.process_info("quitter")["statename"] == "EXITED", 60, "quitter to exit")
    assert client.process_info("quitter")["exitstatus"] == 0
    wait_for(lambda: client.process_info("ticker")["statename"] == "RUNNING", 60, "ticker to run")
    wait_for(lambda: client.process_info("custom")["statename"] == "RUNNING", 60, "conf.d's program to run")
    # A crash is restarted (here at once: the wrapper adds the back-off, these programs have none).
    wait_for(lambda: "boom\nboom\n" in ctl("tail", "crasher").stdout, 60, "crasher to be restarted")

    status = ctl("status")
    assert "ticker" in status.stdout and "RUNNING" in status.stdout
    old_pid = client.process_info("ticker")["pid"]
    assert ctl("restart", "ticker").returncode == 0
    assert client.process_info("ticker")["statename"] == "RUNNING"
    assert client.process_info("ticker")["pid"] != old_pid
    wait_for(
        lambda: "tick" in ctl("tail", "ticker").stdout, 60, "the ticker's output in `supervisorctl tail`"
    )
    client.restart("ticker")
    assert client.process_info("ticker")["statename"] == "RUNNING"
