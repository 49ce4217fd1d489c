"""Program wrappers: VLLM_ARGS splitting, the tee, stop signals, back-off, the app gate, provisioning wait.

Real processes throughout; the supervisord end-to-end runs are in test_boot.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tokenmill_appliance.portal_apps import parse_portal_config
from tokenmill_appliance.programs import run_launch, wait_out_backoff
from tokenmill_appliance.programs.commands import (
    Launch,
    Skip,
    count_gpus,
    engine_api_key,
    has_parallel_size,
    jupyter,
    ray,
    ray_args,
    serve_argv,
    split_args,
    vllm,
)
from tokenmill_appliance.programs.runner import (
    Backoff,
    StopFlag,
    Tee,
    display_command,
    exit_status,
    run_child,
)
from tokenmill_appliance.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ECHO_ARGV = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]


def settings_for(root: Path, **env: str) -> Settings:
    return Settings.from_env({"TOKENMILL_ROOT": str(root), "OPEN_BUTTON_TOKEN": "t" * 16, **env})


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def program_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERVISOR_", "VLLM_", "PORTAL_"))}
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return {
        **env,
        "TOKENMILL_ROOT": str(root),
        "PYTHONPATH": pythonpath,
        "OPEN_BUTTON_TOKEN": "t" * 16,
        **extra,
    }


# --- VLLM_ARGS -----------------------------------------------------------------------------------------


def test_vllm_args_split_with_quotes_and_a_semicolon_is_a_literal_word(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    vllm_args = (
        f"""--served-model-name "my model" --chat-template '{{{{ x }}}} y'; touch {pwned} && echo $(id)"""
    )
    settings = settings_for(tmp_path, VLLM_ARGS=vllm_args, VLLM_MODEL="/models/a b.gguf")
    argv = serve_argv(settings, env={})
    expected_args = [
        "--served-model-name",
        "my model",
        "--chat-template",
        "{{ x }} y",
        ";",
        "touch",
        str(pwned),
    ]
    assert argv == ["serve", "/models/a b.gguf", *expected_args, "&&", "echo", "$(id)"]
    # What the server process receives, word for word, and nothing ran in a shell.
    tee = Tee("vllm", tmp_path / "vllm.log")
    try:
        assert run_child([*ECHO_ARGV, *argv], tee, StopFlag()) == 0
    finally:
        tee.close()
    assert json.loads((tmp_path / "vllm.log").read_text()) == argv
    assert not pwned.exists()


def test_vllm_args_expand_env_vars_only(tmp_path: Path) -> None:
    assert split_args(
        "--download-dir $WORKSPACE/models --x ${UNSET_VAR} '$(rm -rf /)' $(id) `id` *", {"WORKSPACE": "/w"}
    ) == ["--download-dir", "/w/models", "--x", "$(rm -rf /)", "$(id)", "`id`", "*"]


@pytest.mark.parametrize(
    ("vllm_args", "words"),
    [
        ("'$W' \\$W \"$W\" x${W}y", ["$W", "$W", "/w", "x/wy"]),  # no expansion in '...' or after \\
        ('"a\\$b" "a\\nb"', ["a$b", "a\\nb"]),  # in "...", \\ escapes only $ ` " \\ and newline
        # An unquoted value splits at its whitespace, quotes and all, as in sh.
        ("--x $EXTRA --y", ["--x", "--a", "1", "--b", "'two", "words'", "--y"]),
        ('--x "$EXTRA"', ["--x", "--a 1 --b 'two words'"]),  # a quoted one stays one word
        ("--x $EMPTY $UNSET \"$EMPTY\" ''", ["--x", "", ""]),  # empty unquoted words vanish
        ("--chat-template '{{ messages }}' a\\ b", ["--chat-template", "{{ messages }}", "a b"]),
        ("a;b && c", ["a", ";", "b", "&&", "c"]),  # operators are words, never run
        ("--x $$ $1 a\\", ["--x", "$$", "$1", "a\\"]),  # special parameters stay; a trailing \\ too
    ],
)
def test_vllm_args_follow_sh_rules(vllm_args: str, words: list[str]) -> None:
    env = {"W": "/w", "EXTRA": "--a 1 --b 'two words'", "EMPTY": ""}
    assert split_args(vllm_args, env) == words


def test_default_model_gives_no_model_argument(tmp_path: Path) -> None:
    argv = serve_argv(settings_for(tmp_path), env={})
    assert argv[0] == "serve" and argv[1].startswith("--")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--download-dir") + 1] == str(tmp_path / "workspace/models")


def test_default_args_listen_on_the_api_port(tmp_path: Path) -> None:
    api = parse_portal_config("localhost:8000:18123:/docs:vLLM API")[0]
    argv = serve_argv(settings_for(tmp_path), api, env={})
    assert argv[argv.index("--port") + 1 :] == ["18123"] and argv.count("--port") == 1
    argv = serve_argv(settings_for(tmp_path, VLLM_MODEL="org/big"), api, env={})
    assert argv[:2] == ["serve", "org/big"] and argv[argv.index("--max-model-len") + 1] == "32768"


def test_user_args_get_the_api_port_only_when_they_name_none(tmp_path: Path) -> None:
    api = parse_portal_config("localhost:8000:18123:/docs:vLLM API")[0]
    settings = settings_for(tmp_path, VLLM_ARGS="--max-model-len 4096 --download-dir $WORKSPACE/m")
    workspace = settings.workspace
    assert serve_argv(settings, api, env={"WORKSPACE": "/elsewhere"}) == [
        "serve", "--max-model-len", "4096", "--download-dir", f"{workspace}/m", "--port", "18123",
    ]  # fmt: skip
    for named in ("--port 9", "--port=9"):
        argv = serve_argv(settings_for(tmp_path, VLLM_ARGS=named), api, env={})
        assert argv == ["serve", *named.split()]


@pytest.mark.parametrize(
    ("env", "vllm_args", "expected"),
    [
        ({"GPU_COUNT": "4"}, "--port 1", ["--tensor-parallel-size", "4"]),
        ({"GPU_COUNT": "4", "AUTO_PARALLEL": "false"}, "--port 1", []),
        ({"GPU_COUNT": "4", "USE_ALL_GPUS": "false"}, "--port 1", []),
        ({"GPU_COUNT": "4"}, "--port 1 -tp 2", []),
        ({"GPU_COUNT": "4"}, "--pipeline-parallel-size=2", []),
        ({"GPU_COUNT": "4"}, "--tensor_parallel_size 2", []),
        ({"GPU_COUNT": "1"}, "--port 1", ["--tensor-parallel-size", "1"]),
        ({"GPU_COUNT": "0"}, "--port 1", []),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "--port 1", ["--tensor-parallel-size", "3"]),
    ],
)
def test_auto_parallel(tmp_path: Path, env: dict[str, str], vllm_args: str, expected: list[str]) -> None:
    settings = settings_for(tmp_path, VLLM_ARGS=vllm_args, **env)
    argv = serve_argv(settings, env=env)
    assert argv == ["serve", *split_args(vllm_args, {}), *expected]


def test_gpu_counting() -> None:
    assert count_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert has_parallel_size(["--tensor-parallel-size=8"]) and not has_parallel_size(["--tp", "2"])


# --- the app gate --------------------------------------------------------------------------------------


def test_builders_skip_unconfigured_apps(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    apps = parse_portal_config("localhost:1111:11111:/:Instance Portal")
    for builder, name in ((vllm, "vLLM API"), (ray, "Ray Dashboard"), (jupyter, "Jupyter")):
        result = builder(settings, apps)
        assert isinstance(result, Skip) and repr(name) in result.reason and "not in" in result.reason


@pytest.mark.parametrize(
    "given", ["--api-key sk-secret", "--api-key=sk-secret", "--api_key sk-secret", "--api_key=sk-secret"]
)
def test_an_api_key_goes_through_the_environment(tmp_path: Path, given: str) -> None:
    settings = settings_for(tmp_path, VLLM_ARGS=f"--port 18000 {given} --max-num-seqs 4")
    launch = vllm(settings, parse_portal_config("localhost:8000:18000:/docs:vLLM API"))
    assert isinstance(launch, Launch)
    assert "sk-secret" not in " ".join(launch.command)  # `ps` shows command lines to every user
    assert launch.command[-5:] == ["serve", "--port", "18000", "--max-num-seqs", "4"]
    assert launch.env == {"VLLM_API_KEY": "sk-secret"}


def test_several_api_keys_go_through_the_environment_one_a_line(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, VLLM_ARGS="--api-key sk-a sk-b --max-num-seqs 4 --api_key=sk-c")
    launch = vllm(settings, parse_portal_config("localhost:8000:18000:/docs:vLLM API"))
    assert isinstance(launch, Launch) and launch.env == {"VLLM_API_KEY": "sk-c"}  # the last flag wins
    settings = settings_for(tmp_path, VLLM_ARGS="--max-num-seqs 4 --api-key sk-a sk-b")
    launch = vllm(settings, parse_portal_config("localhost:8000:18000:/docs:vLLM API"))
    assert isinstance(launch, Launch) and launch.env == {"VLLM_API_KEY": "sk-a\nsk-b"}
    assert "sk-" not in " ".join(launch.command) and launch.command[-3:] == ["4", "--port", "18000"]
    assert engine_api_key(settings, {}) == "sk-a"
    # The word after the flag is a key even when it starts with a dash (token_urlsafe's can).
    dashed_key = settings_for(tmp_path, VLLM_ARGS="--api-key -sk-dash --max-num-seqs 4")
    dashed_launch = vllm(dashed_key, parse_portal_config("localhost:8000:18000:/docs:vLLM API"))
    assert isinstance(dashed_launch, Launch) and dashed_launch.env == {"VLLM_API_KEY": "-sk-dash"}
    assert "-sk-dash" not in dashed_launch.command
    # And `tokenmill serve` takes each line as a key.
    from tokenmill.entrypoints.cli_args import parse_serve_args

    assert parse_serve_args([], environ=launch.env).api_keys == ["sk-a", "sk-b"]


def test_engine_api_key_is_the_one_the_server_requires(tmp_path: Path) -> None:
    """The portal asks the engine for its model name with this key."""
    keyed = settings_for(tmp_path, VLLM_ARGS="--port 18000 --api-key=sk-args")
    assert engine_api_key(keyed, {"VLLM_API_KEY": "sk-env"}) == "sk-args"
    plain = settings_for(tmp_path, VLLM_ARGS="--port 18000")
    assert engine_api_key(plain, {"VLLM_API_KEY": "sk-env"}) == "sk-env"
    assert engine_api_key(plain, {"TOKENMILL_API_KEY": "sk-tm"}) == "sk-tm"
    assert engine_api_key(plain, {}) is None


def test_jupyter_answers_the_hosts_the_edge_passes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "jupyter"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    launch = jupyter(settings_for(tmp_path), parse_portal_config("localhost:8080:18080:/:Jupyter"))
    assert isinstance(launch, Launch)
    assert "--ip=127.0.0.1" in launch.command and "--port=18080" in launch.command
    assert "--ServerApp.allow_remote_access=True" in launch.command  # else 403 for a non-local Host


def test_ray_dashboard_listens_where_portal_yaml_expects_it(tmp_path: Path) -> None:
    app = parse_portal_config("localhost:8265:28300:/:Ray Dashboard")[0]
    default = ray_args(settings_for(tmp_path), app)
    assert default == [
        "--head",
        "--port",
        "6379",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        "28300",
        "--node-ip-address",
        "127.0.0.1",
    ]
    loopback = ["--node-ip-address", "127.0.0.1"]
    head_only = ray_args(settings_for(tmp_path, RAY_ARGS="--head"), app)
    assert head_only == ["--head", "--dashboard-port", "28300", *loopback]
    own = settings_for(tmp_path, RAY_ARGS="--head --dashboard-port 29000 --node-ip-address=10.0.0.5")
    assert ray_args(own, app) == ["--head", "--dashboard-port", "29000", "--node-ip-address=10.0.0.5"]
    worker = settings_for(tmp_path, RAY_ARGS="--address 10.0.0.5:6379")
    assert ray_args(worker, app) == ["--address", "10.0.0.5:6379", "--dashboard-port", "28300"]


def test_vllm_builder_runs_tokenmill_serve(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, VLLM_ARGS="--port 18000")
    launch = vllm(settings, parse_portal_config("localhost:8000:18000:/docs:vllm api"))
    assert isinstance(launch, Launch)
    assert launch.command[-3:] == ["serve", "--port", "18000"]


def run_wrapper(program: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`tokenmill-appliance program PROGRAM` as supervisord runs it."""
    command = [sys.executable, "-m", "tokenmill_appliance.cli", "program", program]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_wrapper_of_an_unconfigured_app_logs_one_line_and_exits_0(tmp_path: Path) -> None:
    env = program_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal")
    result = run_wrapper("jupyter", env)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "var/log/portal/jupyter.log").read_text()
    assert log.count("\n") == 1 and "'Jupyter' is not in" in log
    assert log in result.stdout
    note = settings_for(tmp_path).skip_note("jupyter")  # the portal shows it as skipped, not failed
    assert "'Jupyter' is not in" in note.read_text()


def test_a_malformed_portal_config_is_one_line_in_the_log_not_a_traceback(tmp_path: Path) -> None:
    env = program_env(tmp_path, PORTAL_CONFIG="localhost:abc:1:/:Instance Portal")
    result = run_wrapper("vllm", env)
    assert result.returncode == 1, result.stderr
    log = (tmp_path / "var/log/portal/vllm.log").read_text()
    assert log.count("\n") == 1 and "configuration error (crash 1)" in log and "abc" in log, log
    assert "Traceback" not in log + result.stderr


def test_an_invalid_portal_yaml_is_reported_in_the_programs_log(tmp_path: Path) -> None:
    env = program_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal")
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc/portal.yaml").write_text("applications: [not, a, mapping\n")
    result = run_wrapper("jupyter", env)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "var/log/portal/jupyter.log").read_text()
    assert "ignoring" in log and "portal.yaml" in log and "using PORTAL_CONFIG" in log, log
    assert "'Jupyter' is not in" in log


def test_wrapper_rejects_an_unknown_program(tmp_path: Path) -> None:
    result = run_wrapper("nope", program_env(tmp_path))
    assert result.returncode == 2 and "usage" in result.stderr


def test_wrapper_waits_while_provisioning_runs(tmp_path: Path) -> None:
    marker = tmp_path / ".provisioning"
    marker.write_text("running")
    log = tmp_path / "var/log/portal/jupyter.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill_appliance.cli", "program", "jupyter"],
        env=program_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal"),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "waiting for provisioning" in log.read_text(), 60, "the waiting line"
        )
        assert proc.poll() is None and "is not in" not in log.read_text()
        marker.unlink()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "'Jupyter' is not in" in log.read_text()


# --- the runner ----------------------------------------------------------------------------------------


def test_tee_keeps_output_raw(tmp_path: Path) -> None:
    raw = b"progress 10%\rprogress 100%\n\x1b[32mgreen\x1b[0m\n\xff\xfe bytes\n"
    tee = Tee("demo", tmp_path / "demo.log")
    try:
        code = "import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1])); sys.exit(3)"
        assert run_child([sys.executable, "-c", code, raw.hex()], tee, StopFlag()) == 3
    finally:
        tee.close()
    assert (tmp_path / "demo.log").read_bytes() == raw


def test_missing_binary_is_status_127(tmp_path: Path) -> None:
    tee = Tee("demo", tmp_path / "demo.log")
    try:
        assert run_child(["/nonexistent/binary"], tee, StopFlag()) == 127
    finally:
        tee.close()
    assert "cannot start /nonexistent/binary" in (tmp_path / "demo.log").read_text()


RUNNER_SCRIPT = """
import sys
from pathlib import Path
from tokenmill_appliance.programs.runner import StopFlag, Tee, run_child
child = [sys.executable, "-c", (
    "import os, signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, lambda *a: (print('child got TERM', flush=True), sys.exit(0)))\\n"
    "print('child pid', os.getpid(), flush=True)\\n"
    "time.sleep(120)\\n"
)]
tee = Tee("demo", Path(sys.argv[1]))
with StopFlag().installed() as stop:
    code = run_child(child, tee, stop)
tee.line(f"wrapper done {code} {stop.is_set}")
"""


def _start_runner(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT, str(log)], env=program_env(tmp_path), stdout=subprocess.DEVNULL
    )
    wait_for(lambda: log.exists() and "child pid" in log.read_text(), 60, "the child to start")
    child_pid = int(log.read_text().split("child pid")[1].split()[0])
    return proc, log, child_pid


def test_term_to_the_wrapper_reaches_the_child(tmp_path: Path) -> None:
    proc, log, _ = _start_runner(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "child got TERM" in text and "wrapper done 0 True" in text


def test_child_dies_with_a_killed_wrapper(tmp_path: Path) -> None:
    proc, _, child_pid = _start_runner(tmp_path)
    child = psutil.Process(child_pid)
    try:
        proc.kill()
        proc.wait(timeout=30)
        wait_for(
            lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 30, "the orphan to end"
        )
    finally:
        if child.is_running():
            child.kill()


def test_exit_status() -> None:
    assert exit_status(0) == 0 and exit_status(3) == 3 and exit_status(-9) == 137 and exit_status(300) == 255


def test_backoff_grows_resets_and_caps(tmp_path: Path) -> None:
    backoff = Backoff(tmp_path / "run/vllm.backoff")
    assert backoff.delay() == 0
    delays = []
    for _ in range(9):
        backoff.record_crash(ran_s=0.5)
        delays.append(backoff.delay())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.record_crash(ran_s=3600)
    assert backoff.failures == 1 and backoff.delay() == 1
    backoff.clear()
    assert backoff.delay() == 0
    backoff.state_file.write_text("not json")
    assert backoff.delay() == 0


def test_logged_commands_hide_secret_values() -> None:
    command = ["tokenmill", "serve", "--api-key", "s3cret", "--hf-token=abc", "--port", "1", "my model"]
    shown = display_command(command)
    assert "s3cret" not in shown and "abc" not in shown
    assert shown == "tokenmill serve --api-key '********' '--hf-token=********' --port 1 'my model'"


HOLD_SCRIPT = """
import sys
from pathlib import Path
from tokenmill_appliance.programs import run_launch
from tokenmill_appliance.programs.commands import Launch
from tokenmill_appliance.programs.runner import Backoff, StopFlag, Tee
py = sys.executable
start, stop_command = [py, "-c", "print('daemon started')"], [py, "-c", "print('daemon stopped')"]
launch = Launch(start, on_exit=stop_command, hold=True)
tee = Tee("demo", Path(sys.argv[1]))
with StopFlag().installed() as stop:
    sys.exit(run_launch(launch, Backoff(Path(sys.argv[1] + ".backoff")), tee, stop))
"""


def test_a_held_launch_stays_up_until_stopped_then_runs_its_exit_command(tmp_path: Path) -> None:
    """The shape of the `ray` program: `ray start` returns at once, `ray stop` runs on the way out."""
    log = tmp_path / "demo.log"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(log)], env=program_env(tmp_path))
    try:
        wait_for(lambda: log.exists() and "daemon started" in log.read_text(), 60, "the start command")
        assert proc.poll() is None and "daemon stopped" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().rstrip().endswith("stopped") and "daemon stopped" in log.read_text()


def test_a_crashing_launch_counts_crashes_and_the_next_start_waits(tmp_path: Path) -> None:
    backoff = Backoff(tmp_path / "demo.backoff")
    tee = Tee("demo", tmp_path / "demo.log")
    crash = Launch([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        assert run_launch(crash, backoff, tee, StopFlag()) == 3
        assert run_launch(crash, backoff, tee, StopFlag()) == 3
        assert backoff.failures == 2
        assert wait_out_backoff(backoff, tee, StopFlag())
        assert run_launch(Launch([sys.executable, "-c", "pass"]), backoff, tee, StopFlag()) == 0
    finally:
        tee.close()
    assert backoff.failures == 0
    log = (tmp_path / "demo.log").read_text()
    assert "exited with status 3" in log and "(crash 2)" in log and "waiting 2s first" in log


def test_auto_parallel_over_one_gpu_says_how_to_serve_on_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine refuses a tensor-parallel size it cannot honour; the log says which setting added it.
    apps = parse_portal_config("localhost:8000:18000:/docs:vLLM API")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    launch = vllm(settings_for(tmp_path, VLLM_ARGS="--port 18000", GPU_COUNT="2"), apps)
    assert isinstance(launch, Launch) and launch.command[-2:] == ["--tensor-parallel-size", "2"]
    assert len(launch.notes) == 1 and "AUTO_PARALLEL=false or GPU_COUNT=1" in launch.notes[0]
    for quiet in ({"GPU_COUNT": "1"}, {"GPU_COUNT": "2", "AUTO_PARALLEL": "false"}):
        launch = vllm(settings_for(tmp_path, VLLM_ARGS="--port 18000", **quiet), apps)
        assert isinstance(launch, Launch) and launch.notes == ()
    launch = vllm(settings_for(tmp_path, VLLM_ARGS="--port 18000 -tp 2", GPU_COUNT="2"), apps)
    assert isinstance(launch, Launch) and launch.notes == ()
