"""supervisord's config and a small client for its XML-RPC socket (spec section 5).

Every program runs through the same wrapper (`tokenmill-appliance program NAME`, see programs.py), which
gates, tees and backs off by itself; supervisord only starts it, restarts it on an unexpected exit and
stops its whole process group. The config lives at `$TOKENMILL_ROOT/etc/supervisor/supervisord.conf`,
one of the places `supervisorctl` looks by default, so `supervisorctl restart vllm` works as typed.
"""

from __future__ import annotations

import http.client
import os
import shlex
import sys
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from tokenmill_appliance.settings import Settings, atomic_write_text

PROGRAM_NAMES = ("portal", "vllm", "ray", "jupyter", "tensorboard", "syncthing", "venv_backup")
"""The programs of every boot, named as in the vLLM instance image."""
PROVISIONING_PROGRAM = "provisioning"
"""Added only on a boot where PROVISIONING_SCRIPT still has to run."""


@dataclass(frozen=True)
class ProgramConfig:
    """One `[program:NAME]` section."""

    name: str
    command: list[str]
    priority: int = 100
    autorestart: str = "unexpected"
    stopwaitsecs: int = 20


def wrapper_command(name: str) -> list[str]:
    """The command supervisord runs for `name`: this interpreter, so the appliance's own environment."""
    return [sys.executable, "-m", "tokenmill_appliance.cli", "program", name]


def default_programs(include_provisioning: bool = False) -> list[ProgramConfig]:
    programs = [
        ProgramConfig(name, wrapper_command(name), priority=10 * (i + 1))
        for i, name in enumerate(PROGRAM_NAMES)
    ]
    if include_provisioning:
        # Runs once; a failure shows as EXITED in `supervisorctl status` and is not retried this boot.
        programs.insert(
            0, ProgramConfig(PROVISIONING_PROGRAM, wrapper_command(PROVISIONING_PROGRAM), 1, "false")
        )
    return programs


def supervisor_log_dir(settings: Settings) -> Path:
    """supervisord's own log and its capture of each program (what `supervisorctl tail` reads)."""
    return settings.path("/var/log/supervisor")


def _value(text: str | Path) -> str:
    # supervisord expands %(name)s in most values, so a literal `%` must be doubled.
    return str(text).replace("%", "%%")


def _quote_command(command: list[str]) -> str:
    text = shlex.join(command)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a supervisord command cannot hold a line break: {text[:80]!r}")
    return _value(text)


def _program_section(program: ProgramConfig, log_dir: Path) -> str:
    # startsecs=0: a wrapper that exits 0 at once (app not configured) ends EXITED, not FATAL. Back-off on
    # a crash is the wrapper's job, since supervisord backs off only while a program is STARTING.
    return f"""
[program:{program.name}]
command={_quote_command(program.command)}
priority={program.priority}
autostart=true
autorestart={program.autorestart}
exitcodes=0
startsecs=0
stopsignal=TERM
stopwaitsecs={program.stopwaitsecs}
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={_value(log_dir / (program.name + ".log"))}
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=2
environment=PROC_NAME="{program.name}",PYTHONUNBUFFERED="1"
"""


def render_supervisord_conf(settings: Settings, programs: list[ProgramConfig]) -> str:
    """The text of supervisord.conf: a unix socket only (no TCP port), the daemon in the foreground."""
    log_dir = supervisor_log_dir(settings)
    socket = _value(settings.supervisor_socket)
    run_dir = settings.supervisor_socket.parent
    user = "user=root\n" if os.geteuid() == 0 else ""
    head = f"""; Written by `tokenmill boot` on every boot: edit PORTAL_CONFIG or portal.yaml, not this file.
[unix_http_server]
file={socket}
chmod=0700

[supervisord]
nodaemon=true
{user}logfile={_value(log_dir / "supervisord.log")}
logfile_maxbytes=10MB
logfile_backups=2
pidfile={_value(run_dir / "supervisord.pid")}
childlogdir={_value(log_dir)}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{socket}

; Programs of your own, as in the vLLM instance image (one named like a program below replaces it).
[include]
files = conf.d/*.conf
"""
    return head + "".join(_program_section(p, log_dir) for p in programs)


def write_supervisord_conf(settings: Settings, programs: list[ProgramConfig]) -> Path:
    """Write supervisord.conf atomically and create the dirs it names; returns its path."""
    supervisor_log_dir(settings).mkdir(parents=True, exist_ok=True)
    settings.supervisor_socket.parent.mkdir(parents=True, exist_ok=True)
    path = settings.supervisor_conf
    (path.parent / "conf.d").mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_supervisord_conf(settings, programs))
    return path


def supervisord_argv(settings: Settings) -> list[str]:
    """supervisord in the foreground on our config, from this interpreter's environment."""
    return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(settings.supervisor_conf)]


def supervisorctl_argv(settings: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(settings.supervisor_conf), *args]


class SupervisorClient:
    """supervisord's XML-RPC interface over its unix socket; close it (or use `with`) when done.

    The connection is kept between calls and opened again once when supervisord dropped it.
    """

    def __init__(self, socket_path: Path) -> None:
        self._transport = SupervisorTransport(None, None, f"unix://{socket_path}")
        # The host is ignored: the transport always talks to the unix socket.
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

    @classmethod
    def for_settings(cls, settings: Settings) -> SupervisorClient:
        return cls(settings.supervisor_socket)

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def call(self, method: str, *args: Any) -> Any:
        """`supervisor.<method>(*args)`; xmlrpc.client.Fault for supervisord's own errors."""
        for attempt in range(2):
            try:
                return getattr(self._proxy.supervisor, method)(*args)
            except (OSError, http.client.HTTPException):
                self._transport.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def process_info(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.call("getProcessInfo", name))

    def all_process_info(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.call("getAllProcessInfo"))

    def state(self) -> str:
        return str(self.call("getState")["statename"])

    def start(self, name: str, wait: bool = True) -> bool:
        return bool(self.call("startProcess", name, wait))

    def stop(self, name: str, wait: bool = True) -> bool:
        return bool(self.call("stopProcess", name, wait))

    def restart(self, name: str) -> None:
        """What `supervisorctl restart NAME` does: stop when running, then start."""
        if self.process_info(name)["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
            self.stop(name)
        self.start(name)

    def shutdown(self) -> None:
        self.call("shutdown")
