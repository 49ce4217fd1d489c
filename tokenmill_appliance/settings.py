"""The appliance's settings: the one place that reads the environment (spec sections 1 and 2).

`Settings.from_env()` turns the environment into a frozen, fully typed object. Every absolute path in it
is resolved under `TOKENMILL_ROOT` (default `/`), so tests and non-root users run the whole appliance
inside a temp dir. The apps of portal.yaml (from PORTAL_CONFIG) are in `portal_apps.py`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shlex
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill_appliance import shell_words

logger = logging.getLogger(__name__)

DEFAULT_PORTAL_CONFIG = (
    "localhost:1111:11111:/:Instance Portal|localhost:8000:18000:/docs:vLLM API"
    "|localhost:8265:28265:/:Ray Dashboard|localhost:8080:18080:/:Jupyter"
)
DEFAULT_RAY_ARGS = "--head --port 6379 --dashboard-host 127.0.0.1 --dashboard-port 28265"
DEFAULT_WEB_USERNAME = "vastai"
MAX_SOCKET_PATH_BYTES = 100
_TOKEN_STRIP = str.maketrans("", "", "\r\n;")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable or entry and how to fix it."""


def root_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve an absolute appliance path under `root` (default: `TOKENMILL_ROOT` or `/`).

    `root_path("/etc/portal.yaml")` is `/etc/portal.yaml` normally and `$TOKENMILL_ROOT/etc/portal.yaml`
    in tests. Relative paths, and paths already under the root (`WORKSPACE=$TOKENMILL_ROOT/ws`), are
    returned as they are.
    """
    if root is None:
        root = os.environ.get("TOKENMILL_ROOT") or "/"
    p = Path(path)
    if not p.is_absolute() or p.is_relative_to(root):
        return p
    return Path(root) / p.relative_to(p.anchor)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` through a temp file in the same dir and a rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_vllm_args(workspace: Path) -> str:
    """VLLM_ARGS when it is unset: the vLLM instance image's default, its download dir in `workspace`."""
    download_dir = shlex.quote(str(workspace / "models"))
    return (
        f"--max-model-len 32768 --enforce-eager --download-dir {download_dir} --host 127.0.0.1 --port 18000"
    )


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An empty value is the default, as for every other variable: `ENABLE_AUTH=` must not open the ports."""
    raw = env.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean; use true or false")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _port_list(env: Mapping[str, str], name: str) -> frozenset[int]:
    ports = set()
    for item in env.get(name, "").split(","):
        if item.strip():
            try:
                ports.add(int(item))
            except ValueError:
                raise SettingsError(f"{name} entry {item.strip()!r} is not a port number") from None
    return frozenset(ports)


def clean_token(value: str) -> str:
    """Strip CR, LF and `;` (they would split a header or a cookie) and surrounding blanks."""
    return value.translate(_TOKEN_STRIP).strip()


def _generated_token(token_file: Path) -> str:
    """One random token shared by every appliance process: kept in a root-only file."""
    try:
        token = clean_token(token_file.read_text(encoding="utf-8"))
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    try:
        atomic_write_text(token_file, token + "\n", mode=0o600)
    except OSError as exc:
        logger.warning(
            "cannot keep the generated token in %s (%s): it lasts for this process only", token_file, exc
        )
    return token


@dataclass(frozen=True)
class Settings:
    """Every appliance setting, typed and defaulted. Build with `Settings.from_env()`."""

    root: Path = Path("/")
    """TOKENMILL_ROOT: every absolute path below is resolved under it."""
    workspace: Path = Path("/workspace")
    """WORKSPACE: persistent work dir (models, backups, .env)."""
    vllm_model: str = ""
    """VLLM_MODEL: local path, .gguf or hub id; empty means the engine's embedded default model."""
    vllm_args: str = ""
    """VLLM_ARGS: extra `serve` arguments as one string; `vllm_argv` splits it with shell rules."""
    auto_parallel: bool = True
    """AUTO_PARALLEL (alias USE_ALL_GPUS): add --tensor-parallel-size GPU_COUNT unless already set."""
    gpu_count: int | None = None
    """GPU_COUNT: GPUs to use; None means count them."""
    portal_config: str = DEFAULT_PORTAL_CONFIG
    """PORTAL_CONFIG: the apps, used when portal.yaml is missing or empty."""
    open_button_token: str = field(default="", repr=False)
    """OPEN_BUTTON_TOKEN: the token of `?token=`, cookies and Bearer; defaults to WEB_PASSWORD."""
    web_password: str = field(default="", repr=False)
    """WEB_PASSWORD: the basic-auth password; defaults to OPEN_BUTTON_TOKEN."""
    web_username: str = DEFAULT_WEB_USERNAME
    """WEB_USERNAME: the basic-auth user."""
    enable_auth: bool = True
    """ENABLE_AUTH: false turns every auth check off."""
    auth_exclude: frozenset[int] = frozenset()
    """AUTH_EXCLUDE: external ports served without auth."""
    enable_https: bool = True
    """ENABLE_HTTPS: TLS on every external port (plain HTTP, with a log line, if no usable cert)."""
    provisioning_script: str = ""
    """PROVISIONING_SCRIPT: URL or local path of a shell script run once at first boot."""
    venv_backup_count: int = 48
    """VENV_BACKUP_COUNT: venv backups kept; 0 disables them."""
    ray_args: str = DEFAULT_RAY_ARGS
    """RAY_ARGS: arguments of `ray start`."""
    cf_tunnel_token: str = field(default="", repr=False)
    """CF_TUNNEL_TOKEN: run a named Cloudflare tunnel instead of quick tunnels."""
    container_label: str = "portal"
    """VAST_CONTAINERLABEL, else `portal`: the auth cookie is `<label>_auth_token`."""
    instance_id: str = "local"
    """CONTAINER_ID, else VAST_CONTAINERLABEL, else the host name: names the venv backup folder."""
    is_token_generated: bool = False
    """True when neither token was set and a random one (kept in `token_file`) is used."""
    portal_host: str = "0.0.0.0"
    """PORTAL_HOST: the address the portal's external ports listen on (tests use 127.0.0.1)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (or `env`). Raises SettingsError naming a bad variable."""
        env = os.environ if env is None else env
        root = Path(env.get("TOKENMILL_ROOT") or "/")
        workspace = root_path(env.get("WORKSPACE") or "/workspace", root)
        vllm_args = env.get("VLLM_ARGS")
        if vllm_args is None:
            vllm_args = default_vllm_args(workspace)
        parallel_name = "AUTO_PARALLEL" if env.get("AUTO_PARALLEL", "").strip() else "USE_ALL_GPUS"
        gpu_count_raw = env.get("GPU_COUNT", "").strip()
        label = clean_token(env.get("VAST_CONTAINERLABEL", "")) or "portal"
        token = clean_token(env.get("OPEN_BUTTON_TOKEN", ""))
        password = clean_token(env.get("WEB_PASSWORD", ""))
        is_generated = not token and not password
        if is_generated:
            token = password = _generated_token(root_path("/etc/portal_token", root))
        settings = cls(
            root=root,
            workspace=workspace,
            vllm_model=env.get("VLLM_MODEL", "").strip(),
            vllm_args=vllm_args,
            auto_parallel=_env_bool(env, parallel_name, True),
            gpu_count=_env_int(env, "GPU_COUNT", 0) if gpu_count_raw else None,
            portal_config=env.get("PORTAL_CONFIG", "").strip() or DEFAULT_PORTAL_CONFIG,
            open_button_token=token or password,
            web_password=password or token,
            web_username=env.get("WEB_USERNAME", "").strip() or DEFAULT_WEB_USERNAME,
            enable_auth=_env_bool(env, "ENABLE_AUTH", True),
            auth_exclude=_port_list(env, "AUTH_EXCLUDE"),
            enable_https=_env_bool(env, "ENABLE_HTTPS", True),
            provisioning_script=env.get("PROVISIONING_SCRIPT", "").strip(),
            venv_backup_count=_env_int(env, "VENV_BACKUP_COUNT", 48),
            ray_args=env.get("RAY_ARGS", "").strip() or DEFAULT_RAY_ARGS,
            cf_tunnel_token=clean_token(env.get("CF_TUNNEL_TOKEN", "")),
            container_label=label,
            instance_id=(env.get("CONTAINER_ID") or env.get("VAST_CONTAINERLABEL") or socket.gethostname()),
            is_token_generated=is_generated,
            portal_host=env.get("PORTAL_HOST", "").strip() or "0.0.0.0",
        )
        settings.vllm_argv  # noqa: B018 - fail early on unbalanced quotes
        return settings

    def path(self, path: str | os.PathLike[str]) -> Path:
        """An absolute appliance path resolved under this settings' root."""
        return root_path(path, self.root)

    @property
    def vllm_argv(self) -> list[str]:
        """VLLM_ARGS split with shell-like rules (never evaluated)."""
        try:
            return shell_words.split(self.vllm_args)
        except ValueError as exc:
            raise SettingsError(f"VLLM_ARGS cannot be split ({exc}): check its quotes") from None

    @property
    def tokens(self) -> tuple[str, ...]:
        """The accepted tokens (OPEN_BUTTON_TOKEN and WEB_PASSWORD), without empties or duplicates."""
        return tuple(dict.fromkeys(t for t in (self.open_button_token, self.web_password) if t))

    @property
    def cookie_name(self) -> str:
        return f"{self.container_label}_auth_token"

    @property
    def portal_yaml(self) -> Path:
        return self.path("/etc/portal.yaml")

    @property
    def token_file(self) -> Path:
        return self.path("/etc/portal_token")

    @property
    def cert_file(self) -> Path:
        return self.path("/etc/instance.crt")

    @property
    def key_file(self) -> Path:
        return self.path("/etc/instance.key")

    @property
    def log_dir(self) -> Path:
        return self.path("/var/log/portal")

    @property
    def run_state_dir(self) -> Path:
        """The wrappers' state (back-off counts, skip notes); boot empties it."""
        return self.path("/var/run/tokenmill")

    def skip_note(self, program: str) -> Path:
        """Where `program`'s wrapper says why it did not start (its app is not in portal.yaml), so the
        portal shows it as skipped, not as failed; removed when the program launches."""
        return self.run_state_dir / f"{program}.skipped"

    @property
    def supervisor_socket(self) -> Path:
        """The unix socket of supervisord's XML-RPC interface (boot writes it into supervisord.conf).

        Under a root too deep for a socket path (AF_UNIX allows 107 bytes; test temp dirs reach that), a
        directory of the temp dir named after the root holds it instead.
        """
        path = self.path("/var/run/supervisor.sock")
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
            return path
        digest = hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"tokenmill-{digest}" / "supervisor.sock"

    @property
    def supervisor_conf(self) -> Path:
        return self.path("/etc/supervisor/supervisord.conf")

    @property
    def provisioning_marker(self) -> Path:
        return self.path("/.provisioning")

    @property
    def venv_backup_dir(self) -> Path:
        return self.workspace / ".venv-backups" / self.instance_id


def mask_token(token: str) -> str:
    """A token safe to log: all but its last 4 characters hidden, and those too in a token shorter than
    16 (a short password would be given away by a quarter of itself)."""
    return "********" + token[-4:] if len(token) >= 16 else "********"
