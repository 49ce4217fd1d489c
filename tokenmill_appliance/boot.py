"""`tokenmill boot`: the container entrypoint (spec section 6).

Every boot: the workspace and the log dir, `$WORKSPACE/.env`, portal.yaml, the TLS pair and
supervisord.conf, then supervisord replaces this process (`exec`), in the foreground. On the first boot
the `provisioning` program runs PROVISIONING_SCRIPT while every other program waits for it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from tokenmill_appliance.portal.tls import ensure_cert_pair
from tokenmill_appliance.portal_apps import (
    PortalApp,
    PortalConfigError,
    default_apps,
    read_portal_yaml,
    write_portal_yaml,
)
from tokenmill_appliance.provisioning import display_source, prepare_provisioning
from tokenmill_appliance.settings import Settings, SettingsError, root_path
from tokenmill_appliance.supervisor import default_programs, supervisord_argv, write_supervisord_conf

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# `export NAME ...` without a value: it only marks names for export, which every name here already is.
_EXPORT_ONLY = re.compile(r"^\s*export(\s+[A-Za-z_][A-Za-z0-9_]*)+\s*$")


class BootError(RuntimeError):
    """A problem that stops the boot; the message names it and the fix."""


def log(text: str) -> None:
    print(f"tokenmill boot: {text}", flush=True)


def parse_env_file(text: str, env: MutableMapping[str, str]) -> list[str]:
    """`KEY=VALUE` lines of a .env file into `env`, with the shell's quoting and `$VAR` expansion.

    It is parsed, not sourced: nothing in it is executed (`$(...)` stays literal text). A line that is not
    an assignment, or whose quotes do not close, is logged and skipped, as sourcing would carry on past it.
    Returns the names set, in order.
    """
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#") or _EXPORT_ONLY.match(line):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            log(f".env line {number} is not KEY=VALUE, skipped: {line.strip()[:80]!r}")
            continue
        name, raw = match.groups()
        try:
            env[name] = shell_value(raw, env)
        except ValueError as exc:
            log(f".env line {number} ({name}) skipped: {exc}; check its quotes")
            continue
        names.append(name)
    return names


def shell_value(raw: str, env: Mapping[str, str]) -> str:
    """The value a shell assigns for `NAME=raw`: single quotes literal; in double quotes and bare text
    `$VAR`/`${VAR}` expanded and backslash escapes undone; an unquoted ` #` starts a comment."""
    out: list[str] = []
    raw = raw.lstrip()
    i, n = 0, len(raw)
    while i < n:
        char = raw[i]
        if char == "'":
            close = raw.find("'", i + 1)
            if close < 0:
                raise ValueError("no closing single quote")
            out.append(raw[i + 1 : close])
            i = close + 1
        elif char == '"':
            i += 1
            while i < n and raw[i] != '"':
                if raw[i] == "\\" and i + 1 < n and raw[i + 1] in '$`"\\':
                    out.append(raw[i + 1])
                    i += 2
                else:
                    i = _append_char_or_var(raw, i, env, out)
            if i >= n:
                raise ValueError("no closing double quote")
            i += 1
        elif char == "\\":
            out.append(raw[i + 1 : i + 2])
            i += 2
        elif char.isspace():
            rest = raw[i:].lstrip()
            if not rest or rest.startswith("#"):
                break
            out.append(" ")  # more words: kept, joined by one space
            i = n - len(rest)
        else:
            i = _append_char_or_var(raw, i, env, out)
    return "".join(out)


def _append_char_or_var(raw: str, i: int, env: Mapping[str, str], out: list[str]) -> int:
    """Appends `$VAR`'s value (unset: empty) or the character at `i`; returns the next position."""
    match = _ENV_VAR.match(raw, i) if raw[i] == "$" else None
    if match is None:
        out.append(raw[i])
        return i + 1
    out.append(env.get(match.group(1) or match.group(2), ""))
    return match.end()


def source_env_file(workspace: Path, env: MutableMapping[str, str]) -> list[str]:
    path = workspace / ".env"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    names = parse_env_file(text, env)
    if names:
        # Names only: values may be secrets.
        log(f"read {path}: {', '.join(names)}")
    return names


def prepare_dirs(settings: Settings) -> None:
    settings.workspace.mkdir(parents=True, exist_ok=True)
    # 1777 like /tmp: programs running as other users can add their logs, not remove others'.
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.log_dir, 0o1777)
    run_state = settings.run_state_dir
    shutil.rmtree(run_state, ignore_errors=True)
    run_state.mkdir(parents=True, exist_ok=True)


def prepare_portal_yaml(settings: Settings) -> list[PortalApp]:
    """Keep an existing valid portal.yaml; else write one from PORTAL_CONFIG."""
    path = settings.portal_yaml
    try:
        existing = read_portal_yaml(path)
    except PortalConfigError as exc:
        log(f"{exc}; fix or delete {path}. Using PORTAL_CONFIG meanwhile (the file is left as it is)")
        existing = None
        keep_file = True
    else:
        keep_file = existing is not None
    if existing:
        log(f"keeping {path} (edit it and `supervisorctl restart portal` to change the apps)")
        return existing
    try:
        apps = default_apps(settings)
    except PortalConfigError as exc:
        raise BootError(
            f"{exc}. Fix PORTAL_CONFIG (entries hostname:external_port:local_port:path:Name)"
        ) from None
    if not keep_file:
        write_portal_yaml(path, apps)
        log(f"wrote {path} from PORTAL_CONFIG")
    return apps


def prepare_tls(settings: Settings) -> None:
    if not settings.enable_https:
        return
    if not ensure_cert_pair(settings.cert_file, settings.key_file):
        log(f"no usable TLS pair at {settings.cert_file}: the portal serves plain HTTP")


def prepare(env: MutableMapping[str, str]) -> Settings:
    """Everything before supervisord; returns the settings it ran with. Raises BootError or SettingsError."""
    workspace = root_path(env.get("WORKSPACE") or "/workspace", env.get("TOKENMILL_ROOT") or "/")
    workspace.mkdir(parents=True, exist_ok=True)
    source_env_file(workspace, env)
    settings = Settings.from_env(env)
    prepare_dirs(settings)
    apps = prepare_portal_yaml(settings)
    log("apps: " + ", ".join(f"{a.name} ({a.external_port}->{a.internal_port})" for a in apps))
    prepare_tls(settings)
    is_provisioning = prepare_provisioning(settings)
    if is_provisioning:
        log(f"first boot: running PROVISIONING_SCRIPT {display_source(settings.provisioning_script)}")
    conf = write_supervisord_conf(settings, default_programs(include_provisioning=is_provisioning))
    log(f"wrote {conf}")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill boot", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--no-exec",
        action="store_true",
        help="prepare the machine and write the configs, but do not start supervisord",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = prepare(os.environ)
    except (BootError, SettingsError, OSError) as exc:
        print(f"tokenmill boot: {exc}", file=sys.stderr, flush=True)
        return 2
    command = supervisord_argv(settings)
    if args.no_exec:
        log("would start: " + shlex.join(command))
        return 0
    log("starting supervisord (`supervisorctl status` to see the programs)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
