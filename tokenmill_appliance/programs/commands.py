"""What each supervisor program runs, decided from the settings and portal.yaml (spec section 5).

A builder returns a `Launch`, or a `Skip` with the one line that explains why the program is not
started (its app is not configured, its binary is not installed); the wrapper then exits 0 and
supervisord shows it EXITED, not FATAL.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill_appliance import shell_words
from tokenmill_appliance.portal_apps import API_APP_NAME, RAY_APP_NAME, PortalApp, find_app
from tokenmill_appliance.settings import DEFAULT_RAY_ARGS, Settings, default_vllm_args

_PARALLEL_FLAGS = re.compile(
    r"^(--tensor-parallel-size|-tp|--pipeline-parallel-size|-pp|--data-parallel-size|-dp)(=.*)?$"
)


@dataclass(frozen=True)
class Launch:
    """A child to run. `hold`: once `command` exits 0 (a daemon started), stay up until stopped."""

    command: list[str]
    on_exit: list[str] | None = None
    hold: bool = False
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Lines for the program's log before it starts."""


@dataclass(frozen=True)
class Skip:
    reason: str


Builder = Callable[[Settings, list[PortalApp]], Launch | Skip]


def not_configured(settings: Settings, app_name: str) -> Skip:
    return Skip(
        f"{app_name!r} is not in {settings.portal_yaml}; not starting it "
        f"(add it to PORTAL_CONFIG or portal.yaml, then `supervisorctl start` it)"
    )


def tokenmill_command() -> list[str]:
    """The engine's `tokenmill` CLI of this environment; `python -m` when its script is not installed."""
    beside = Path(sys.executable).with_name("tokenmill")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("tokenmill")
    return [found] if found else [sys.executable, "-m", "tokenmill.entrypoints.cli"]


def split_args(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Split and expand `$VAR`/`${VAR}` as sh does (`shell_words`); nothing is ever executed: a `;`,
    `&&` or `$(...)` stays a literal word, handed to the server."""
    return shell_words.split(text, os.environ if env is None else env)


def has_parallel_size(args: list[str]) -> bool:
    return any(_PARALLEL_FLAGS.match(dashed(arg)) for arg in args)


def count_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs this machine offers: CUDA_VISIBLE_DEVICES when set, else the NVIDIA driver's list."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def serve_argv(
    settings: Settings, api: PortalApp | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """`serve [MODEL] VLLM_ARGS... [--tensor-parallel-size N]`, as a list (no shell in between).

    No MODEL argument when VLLM_MODEL is unset: the engine then serves its embedded default model (the
    default's `--max-model-len 32768` is more than its 8k: the engine serves its limit, with a warning).
    The server listens where portal.yaml's `api` app expects it: its internal port is added when VLLM_ARGS
    names no port, and replaces the default VLLM_ARGS' 18000. `$WORKSPACE` is the settings' workspace.
    """
    env = os.environ if env is None else env
    args = split_args(settings.vllm_args, {**env, "WORKSPACE": str(settings.workspace)})
    if api is not None:
        is_default = settings.vllm_args == default_vllm_args(settings.workspace)
        args = listening_at(args, "--port", api.internal_port, is_default)
    argv = ["serve", *([settings.vllm_model] if settings.vllm_model else []), *args]
    size = auto_parallel_size(settings, args, env)
    return argv if size is None else [*argv, "--tensor-parallel-size", str(size)]


def auto_parallel_size(settings: Settings, args: list[str], env: Mapping[str, str]) -> int | None:
    """The `--tensor-parallel-size` AUTO_PARALLEL adds (the GPU count), unless `args` set a parallel size."""
    if not settings.auto_parallel or has_parallel_size(args):
        return None
    gpus = settings.gpu_count if settings.gpu_count is not None else count_gpus(env)
    return gpus if gpus > 0 else None


def listening_at(args: list[str], flag: str, port: int, is_default: bool) -> list[str]:
    """`args` with `flag port` where they name no `flag`, or are the default arguments (whose port stands
    for the app's); a port the user chose stands."""
    if is_default or not has_option(args, flag):
        return [*without_option(args, flag), flag, str(port)]
    return args


def dashed(arg: str) -> str:
    """`arg` with the underscores of its flag name made dashes (`--api_key=x` -> `--api-key=x`): the
    server, like vLLM's, takes both spellings, so both must be found."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def has_option(args: list[str], flag: str) -> bool:
    return any(dashed(arg) == flag or dashed(arg).startswith(f"{flag}=") for arg in args)


def option_values(args: list[str], flag: str) -> list[str]:
    """The values of the last `flag V1 V2 ...` (the word after it, whatever it is, and every one up to the
    next flag: as `without_option(many=True)` drops them) or `flag=V` in `args`."""
    values: list[str] = []
    for i, arg in enumerate(args):
        if dashed(arg) == flag:
            following = args[i + 2 :]
            end = next((j for j, word in enumerate(following) if word.startswith("-")), len(following))
            values = args[i + 1 : i + 2] + following[:end]
        elif dashed(arg).startswith(f"{flag}="):
            values = [arg.partition("=")[2]]
    return values


def without_option(args: list[str], flag: str, many: bool = False) -> list[str]:
    """`args` without `flag VALUE` and `flag=VALUE`; `many`: without every value up to the next flag."""
    kept: list[str] = []
    skipping = skip_one = False
    for arg in args:
        if skip_one or (skipping and not arg.startswith("-")):
            skip_one = False
        elif dashed(arg) == flag:
            skipping, skip_one = many, True
        else:
            skipping = False
            if not dashed(arg).startswith(f"{flag}="):
                kept.append(arg)
    return kept


def portal(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    # The edge serves every app's port, so it runs even without an "Instance Portal" entry.
    return Launch([sys.executable, "-m", "tokenmill_appliance.cli", "portal", "--host", settings.portal_host])


def engine_api_keys(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """The keys the `vllm` program's server takes: `--api-key` in VLLM_ARGS, else the environment
    variables `tokenmill serve` reads (VLLM_API_KEY, TOKENMILL_API_KEY; one key a line); [] when it
    requires none."""
    env = os.environ if env is None else env
    keys = option_values(split_args(settings.vllm_args, env), "--api-key")
    from_env = env.get("VLLM_API_KEY") or env.get("TOKENMILL_API_KEY") or ""
    return keys or [key for key in from_env.splitlines() if key]


def engine_api_key(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The first of `engine_api_keys` (the one the portal asks the engine with)."""
    return next(iter(engine_api_keys(settings, env)), None)


def vllm(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    api = find_app(apps, API_APP_NAME)
    if api is None:
        return not_configured(settings, API_APP_NAME)
    argv = serve_argv(settings, api)
    notes: tuple[str, ...] = ()
    size = auto_parallel_size(settings, split_args(settings.vllm_args), os.environ)
    if size is not None and size > 1:
        notes = (
            f"AUTO_PARALLEL added --tensor-parallel-size {size} (the GPU count), but tokenmill serves a "
            "model on one GPU: set AUTO_PARALLEL=false or GPU_COUNT=1 to serve on the first one",
        )
    api_keys = option_values(argv, "--api-key")
    if not api_keys:
        return Launch([*tokenmill_command(), *argv], cwd=settings.workspace, notes=notes)
    # Through the environment, which `ps` does not show to other users, not on the command line (nor in
    # the "starting:" log line). Several keys go one a line: no key can hold a newline (an HTTP header
    # cannot), and `tokenmill serve` reads each line as a key.
    argv = without_option(argv, "--api-key", many=True)
    env = {"VLLM_API_KEY": "\n".join(api_keys)}
    return Launch([*tokenmill_command(), *argv], cwd=settings.workspace, env=env, notes=notes)


def ray(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    app = find_app(apps, RAY_APP_NAME)
    if app is None:
        return not_configured(settings, RAY_APP_NAME)
    binary = shutil.which("ray")
    if binary is None:
        return Skip(f"{RAY_APP_NAME!r} is configured but `ray` is not installed; not starting it")
    return Launch([binary, "start", *ray_args(settings, app)], on_exit=[binary, "stop"], hold=True)


def ray_args(settings: Settings, app: PortalApp) -> list[str]:
    """RAY_ARGS, the dashboard where portal.yaml's Ray app expects it (as `serve_argv` places the API):
    its internal port is added when RAY_ARGS names none, and replaces the default RAY_ARGS' 28265.

    A head node that names no `--node-ip-address` gets 127.0.0.1: Ray binds its GCS, raylet and client
    servers to the node's address, and runs whatever code reaches them. A cluster names its own.
    """
    is_default = settings.ray_args == DEFAULT_RAY_ARGS
    args = listening_at(split_args(settings.ray_args), "--dashboard-port", app.internal_port, is_default)
    if "--head" in args and not has_option(args, "--node-ip-address"):
        args += ["--node-ip-address", "127.0.0.1"]
    return args


def _binary_app(settings: Settings, apps: list[PortalApp], app_name: str, binary: str) -> PortalApp | Skip:
    app = find_app(apps, app_name)
    if app is None:
        return not_configured(settings, app_name)
    if shutil.which(binary) is None:
        return Skip(f"{app_name!r} is configured but `{binary}` is not installed; not starting it")
    return app


def jupyter(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    app = _binary_app(settings, apps, "Jupyter", "jupyter")
    if isinstance(app, Skip):
        return app
    # Bound to loopback without its own token: the portal edge in front of it does the auth.
    command = [
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={app.internal_port}",
    ]
    command += [
        f"--ServerApp.root_dir={settings.workspace}",
        "--IdentityProvider.token=",
        "--ServerApp.trust_xheaders=True",
        # Bound to loopback, Jupyter refuses any Host but a local one (403), and the edge passes the
        # browser's Host on.
        "--ServerApp.allow_remote_access=True",
    ]
    return Launch(command, cwd=settings.workspace)


def tensorboard(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    app = _binary_app(settings, apps, "Tensorboard", "tensorboard")
    if isinstance(app, Skip):
        return app
    command = [
        "tensorboard",
        f"--logdir={settings.workspace}",
        "--host=127.0.0.1",
        f"--port={app.internal_port}",
    ]
    return Launch(command, cwd=settings.workspace)


def syncthing(settings: Settings, apps: list[PortalApp]) -> Launch | Skip:
    app = _binary_app(settings, apps, "Syncthing", "syncthing")
    if isinstance(app, Skip):
        return app
    home = settings.workspace / ".syncthing"
    command = ["syncthing", "--no-browser", f"--gui-address=127.0.0.1:{app.internal_port}", f"--home={home}"]
    return Launch(command, cwd=settings.workspace)


BUILDERS: dict[str, Builder] = {
    "portal": portal,
    "vllm": vllm,
    "ray": ray,
    "jupyter": jupyter,
    "tensorboard": tensorboard,
    "syncthing": syncthing,
}
