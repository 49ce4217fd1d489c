"""`tokenmill boot` end to end: a real supervisord under a temp TOKENMILL_ROOT, real programs, real servers.

Each boot runs `tokenmill-appliance boot` as the test's child; it execs supervisord, which the finalizer
shuts down, killing (and reporting) anything left behind.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tokenmill_appliance.boot import parse_env_file
from tokenmill_appliance.portal.services import describe
from tokenmill_appliance.settings import Settings
from tokenmill_appliance.supervisor import SupervisorClient

REPO = Path(__file__).resolve().parents[2]
TOKEN = "boot-test-token-0123456789"
SERVER_START_S = 480
_CLEARED = (
    "VLLM_",
    "PORTAL_",
    "SUPERVISOR_",
    "OPEN_BUTTON_TOKEN",
    "WEB_",
    "PROVISIONING_SCRIPT",
    "WORKSPACE",
)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env |= {"TOKENMILL_ROOT": str(root), "OPEN_BUTTON_TOKEN": TOKEN, "PORTAL_HOST": "127.0.0.1"}
    env |= {"CONTAINER_ID": "test", "VENV_BACKUP_COUNT": "0", "HF_HUB_OFFLINE": "1"}
    return env | extra


class Appliance:
    """One boot under `root`; `client` talks to its supervisord, `ctl` runs supervisorctl verbatim.

    Its console is a pipe, as under docker, copied to `root/boot.out`.
    """

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.conf = root / "etc/supervisor/supervisord.conf"
        self.out = (root / "boot.out").open("ab", buffering=0)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill_appliance.cli", "boot"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.console = threading.Thread(target=self._copy_console, daemon=True)
        self.console.start()
        self.client = SupervisorClient(root / "var/run/supervisor.sock")
        socket_path = root / "var/run/supervisor.sock"
        wait_for(lambda: socket_path.exists() or self.proc.poll() is not None, 120, "supervisord's socket")
        assert self.proc.poll() is None, (root / "boot.out").read_text()
        wait_for(lambda: self.client.state() == "RUNNING", 60, "supervisord to run")

    def _copy_console(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.out.write(chunk)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def state(self, name: str) -> str:
        return str(self.client.process_info(name)["statename"])

    def wait_state(self, name: str, state: str, timeout: float = 60) -> None:
        wait_for(lambda: self.state(name) == state, timeout, f"{name} to be {state}")

    def log(self, name: str) -> str:
        path = self.root / "var/log/portal" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def shutdown(self) -> None:
        """Stop supervisord and everything under it; AssertionError naming any process left behind."""
        tree = [psutil.Process(self.proc.pid)]
        try:
            tree += tree[0].children(recursive=True)
            self.client.shutdown()
        except (psutil.Error, OSError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.client.close()
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            p.kill()
        self.console.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.out.close()
        assert not alive, f"left behind: {alive}"


@pytest.fixture
def boot() -> Iterator[Callable[..., Appliance]]:
    booted: list[Appliance] = []

    def start(root: Path, **env: str) -> Appliance:
        appliance = Appliance(root, base_env(root, **env))
        booted.append(appliance)
        return appliance

    yield start
    for appliance in booted:
        if appliance.proc.poll() is None:
            appliance.shutdown()


def portal_only(port: int) -> str:
    return f"localhost:{port}:{free_port()}:/:Instance Portal"


@pytest.mark.slow
def test_unconfigured_programs_end_exited_with_their_log_line(
    tmp_path: Path, boot: Callable[..., Appliance]
) -> None:
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace/.env").write_text(
        'export CONTAINER_ID="from dotenv"\nVENV_BACKUP_COUNT=2 # kept\n'
    )
    appliance = boot(tmp_path, PORTAL_CONFIG=portal_only(free_port()))
    for name in ("vllm", "ray", "jupyter", "tensorboard", "syncthing"):
        appliance.wait_state(name, "EXITED")
        assert appliance.client.process_info(name)["exitstatus"] == 0
        assert "is not in" in appliance.log(name) and appliance.log(name).count("\n") == 1
    assert "'vLLM API' is not in" in appliance.log("vllm")
    # The Services tab shows them as skipped, with the reason, and the running portal as not.
    skip_note = Settings.from_env({"TOKENMILL_ROOT": str(tmp_path)}).skip_note
    shown = describe(appliance.client.process_info("jupyter"), skip_note)
    assert shown["exit_status"] == 0 and "'Jupyter' is not in" in shown["skipped"]
    assert describe(appliance.client.process_info("portal"), skip_note)["skipped"] is None
    status = appliance.ctl("status")
    assert "jupyter" in status.stdout and "EXITED" in status.stdout and "FATAL" not in status.stdout
    assert appliance.state("portal") == "RUNNING"
    # $WORKSPACE/.env reached the programs.
    backups = tmp_path / "workspace/.venv-backups/from dotenv"
    wait_for(lambda: (backups / "venv-main-latest.txt").exists(), 120, "a venv backup")
    assert stat.S_IMODE((tmp_path / "var/log/portal").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "var/run/supervisor.sock").stat().st_mode) == 0o700
    apps = yaml.safe_load((tmp_path / "etc/portal.yaml").read_text())["applications"]
    assert list(apps) == ["Instance Portal"]
    boot_out = (tmp_path / "boot.out").read_text()
    # Every program's output also reaches the console (the container log).
    assert "jupyter: 'Jupyter' is not in" in boot_out
    assert TOKEN not in boot_out and TOKEN not in (tmp_path / "etc/supervisor/supervisord.conf").read_text()


def test_env_file_is_parsed_not_sourced() -> None:
    env = {"HOME_DIR": "/h"}
    text = "# comment\nexport A='x $HOME_DIR'\nexport A\nexport B C\nD=\"$HOME_DIR/d\" # note\nE=$(id)\n"
    assert parse_env_file(text, env) == ["A", "D", "E"]
    assert (env["A"], env["D"], env["E"]) == ("x $HOME_DIR", "/h/d", "$(id)")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ('"cost \\$B"', "cost $B"),  # an escaped $ in double quotes
        ("a'$B'", "a$B"),  # single quotes anywhere in the word
        ("pa#ss", "pa#ss"),  # a # inside a word is no comment
        ("x #c", "x"),
        ('"a#b" # note', "a#b"),
        ("a\\ b", "a b"),
        ('"q\\"uote"', 'q"uote'),
        ("${B}x$Bz", "beex"),  # $Bz is unset
        ("'it''s'", "its"),
    ],
)
def test_env_file_values_are_what_the_shell_assigns(raw: str, value: str) -> None:
    env = {"B": "bee"}
    assert parse_env_file(f"V={raw}\n", env) == ["V"]
    assert env["V"] == value
    shell = subprocess.run(["bash", "-c", f'B=bee; V={raw}\nprintf %s "$V"'], capture_output=True, text=True)
    assert shell.stdout == value  # the expectation itself, checked against bash


def test_env_file_lines_that_are_no_assignment_are_skipped_with_a_log_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env: dict[str, str] = {}
    text = "echo hi\nA=1\nB='open\nsource other.env\nC=3\n"
    assert parse_env_file(text, env) == ["A", "C"]
    assert env == {"A": "1", "C": "3"}
    err = capsys.readouterr()
    logged = err.out + err.err
    assert "line 1 is not KEY=VALUE, skipped" in logged and "line 3 (B) skipped" in logged


def test_malformed_portal_config_is_a_clear_error(tmp_path: Path) -> None:
    env = base_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal|localhost:80x0:18000")
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill_appliance.cli", "boot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "'localhost:80x0:18000'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "etc/supervisor/supervisord.conf").exists()


def test_an_existing_portal_yaml_wins(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    existing = (
        "applications:\n  Mine:\n    hostname: localhost\n    external_port: 7000\n    internal_port: 7001\n"
    )
    (tmp_path / "etc/portal.yaml").write_text(existing)
    env = base_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal")
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill_appliance.cli", "boot", "--no-exec"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/portal.yaml").read_text() == existing
    assert (tmp_path / "etc/instance.crt").exists() and (tmp_path / "etc/instance.key").exists()
    assert (tmp_path / "etc/supervisor/supervisord.conf").exists()


def test_an_invalid_portal_yaml_is_named_and_left_for_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    broken = "applications:\n  Mine:\n    hostname: localhost\n    external_port: nope\n"
    (tmp_path / "etc/portal.yaml").write_text(broken)
    env = base_env(tmp_path, PORTAL_CONFIG="localhost:1111:11111:/:Instance Portal")
    command = [sys.executable, "-m", "tokenmill_appliance.cli", "boot", "--no-exec"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'nope' is not an integer" in result.stdout and "Instance Portal (1111->11111)" in result.stdout
    assert (tmp_path / "etc/portal.yaml").read_text() == broken


PROVISION = """\
echo "provisioning in $(pwd)"
test -e "$TOKENMILL_ROOT/.provisioning" && echo "marker present"
echo run >> "$WORKSPACE/runs"
while [ ! -e "$WORKSPACE/release" ]; do sleep 0.1; done
echo done
"""


@pytest.mark.slow
def test_provisioning_runs_once_on_first_boot(tmp_path: Path, boot: Callable[..., Appliance]) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "provision.sh").write_text(PROVISION)
    env = {"PROVISIONING_SCRIPT": "/workspace/provision.sh", "WORKSPACE": "/workspace"}
    first = boot(tmp_path, PORTAL_CONFIG=portal_only(free_port()), **env)
    wait_for(lambda: (workspace / "runs").exists(), 120, "the script to start")
    assert (tmp_path / ".provisioning").exists()
    wait_for(lambda: "waiting for provisioning" in first.log("jupyter"), 60, "jupyter to wait")
    assert first.state("jupyter") == "RUNNING" and "is not in" not in first.log("jupyter")
    (workspace / "release").touch()
    first.wait_state("provisioning", "EXITED", 120)
    first.wait_state("jupyter", "EXITED", 60)
    log = first.log("provisioning")
    assert (
        "marker present" in log and f"provisioning in {workspace}" in log and "provisioning succeeded" in log
    )
    assert not (tmp_path / ".provisioning").exists()
    first.shutdown()

    second = boot(tmp_path, PORTAL_CONFIG=portal_only(free_port()), **env)
    second.wait_state("jupyter", "EXITED", 60)
    assert "provisioning" not in second.ctl("status").stdout
    assert (workspace / "runs").read_text() == "run\n"


@pytest.mark.slow
def test_a_failing_provisioning_script_is_logged_and_boot_goes_on(
    tmp_path: Path, boot: Callable[..., Appliance]
) -> None:
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace/fails.sh").write_text("echo about to fail\nexit 7\n")
    appliance = boot(
        tmp_path, PORTAL_CONFIG=portal_only(free_port()), PROVISIONING_SCRIPT="/workspace/fails.sh"
    )
    appliance.wait_state("provisioning", "EXITED", 120)
    appliance.wait_state("jupyter", "EXITED", 60)
    assert "about to fail" in appliance.log("provisioning")
    assert "provisioning failed (status 7)" in appliance.log("provisioning")
    assert appliance.state("portal") == "RUNNING"
    assert not (tmp_path / ".provisioning").exists()


# --- the whole appliance with the real portal and the real model server -----------------------------------


def _server_missing() -> bool:
    return importlib.util.find_spec("tokenmill.entrypoints.openai.api_server") is None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Appliance, int, int]]:
    if _server_missing():
        pytest.skip("the model server (tokenmill.entrypoints.openai.api_server) cannot be imported")
    root = tmp_path_factory.mktemp("served")
    api_port, server_port = free_port(), free_port()
    portal_config = f"{portal_only(free_port())}|localhost:{api_port}:{server_port}:/docs:vLLM API"
    # No VLLM_ARGS: the image's default (--max-model-len 32768 ... --port 18000). The engine serves the
    # embedded model's own 8k limit; the vllm program moves the port to the vLLM API's internal one.
    appliance = Appliance(root, base_env(root, PORTAL_CONFIG=portal_config))
    try:
        yield appliance, api_port, server_port
    finally:
        appliance.shutdown()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def edge_get(api_port: int, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"https://127.0.0.1:{api_port}{path}", headers=headers, verify=False, timeout=30)


def wait_for_api(appliance: Appliance, api_port: int) -> None:
    """Until the server says it is ready (its /health turns 200 once the model is loaded), via the edge."""

    seen = len(appliance.log("vllm"))

    def ready() -> bool:
        # Fail at the first crash rather than at the deadline: the log says why.
        log = appliance.log("vllm")
        assert "supervisord restarts it" not in log[seen:], log[-3000:]
        assert appliance.state("vllm") in ("STARTING", "RUNNING"), log[-3000:]
        try:
            return edge_get(api_port, "/health", BEARER).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, SERVER_START_S, "the model server's /health through the portal edge")


def complete(api_port: int) -> httpx.Response:
    model = "SmolLM2-135M-Instruct"
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    url = f"https://127.0.0.1:{api_port}/v1/completions"
    return httpx.post(url, json=body, headers=BEARER, verify=False, timeout=120)


@pytest.mark.slow
def test_boot_serves_the_api_through_the_edge(served: tuple[Appliance, int, int]) -> None:
    appliance, api_port, _ = served

    def both_running() -> bool:
        lines = [line.split() for line in appliance.ctl("status").stdout.splitlines()]
        return {"portal", "vllm"} <= {words[0] for words in lines if words[1:2] == ["RUNNING"]}

    wait_for(both_running, 60, "`supervisorctl status` to show portal and vllm RUNNING")
    wait_for_api(appliance, api_port)
    models = edge_get(api_port, "/v1/models", BEARER).json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    completion = complete(api_port)
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"]
    assert edge_get(api_port, "/v1/models").status_code == 401
    assert edge_get(api_port, "/v1/models", {"Authorization": "Bearer wrong"}).status_code == 401
    # No Ray Dashboard configured: ray is skipped and the model server did not wait for it.
    assert appliance.state("ray") == "EXITED"


@pytest.mark.slow
def test_supervisorctl_restart_vllm_brings_it_back(served: tuple[Appliance, int, int]) -> None:
    appliance, api_port, _ = served
    wait_for_api(appliance, api_port)
    old_pid = appliance.client.process_info("vllm")["pid"]
    result = appliance.ctl("restart", "vllm")
    assert result.returncode == 0 and "vllm: started" in result.stdout, result.stdout + result.stderr
    assert appliance.client.process_info("vllm")["pid"] != old_pid
    wait_for_api(appliance, api_port)
    assert complete(api_port).status_code == 200


@pytest.mark.slow
def test_a_killed_model_server_is_restarted(served: tuple[Appliance, int, int]) -> None:
    appliance, api_port, server_port = served
    wait_for_api(appliance, api_port)
    wrapper_pid = appliance.client.process_info("vllm")["pid"]
    (server,) = psutil.Process(wrapper_pid).children()
    assert "serve" in server.cmdline()
    server.kill()
    wait_for(lambda: appliance.client.process_info("vllm")["pid"] != wrapper_pid, 60, "supervisord's restart")

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{server_port}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, SERVER_START_S, "/health after the restart")
    assert "was killed by SIGKILL" in appliance.log("vllm")


def test_boot_and_wrappers_never_import_the_engine_or_torch(tmp_path: Path) -> None:
    code = (
        "import sys, tokenmill_appliance.boot, tokenmill_appliance.programs, tokenmill_appliance.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tokenmill', 'torch')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=base_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tokenmill_boot_is_the_same_entrypoint(tmp_path: Path) -> None:
    env = base_env(tmp_path, PORTAL_CONFIG=portal_only(free_port()))
    command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "boot", "--no-exec"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "supervisor.supervisord -n -c" in result.stdout
    assert (tmp_path / "etc/supervisor/supervisord.conf").exists()


@pytest.mark.slow
def test_a_dead_engine_core_gets_its_model_server_restarted(served: tuple[Appliance, int, int]) -> None:
    """The model server whose engine core died answers 503 a while, then exits 1, and supervisord starts
    a fresh one (spec §7: supervisor restarts a dead one)."""
    appliance, api_port, _ = served
    wait_for_api(appliance, api_port)
    wrapper_pid = appliance.client.process_info("vllm")["pid"]
    (server,) = psutil.Process(wrapper_pid).children()
    (core,) = [c for c in server.children() if "multiprocessing.spawn" in " ".join(c.cmdline())]
    core.kill()
    wait_for(lambda: appliance.client.process_info("vllm")["pid"] != wrapper_pid, 90, "supervisord's restart")
    assert "the engine core died" in appliance.log("vllm")
    wait_for_api(appliance, api_port)
    assert complete(api_port).status_code == 200
