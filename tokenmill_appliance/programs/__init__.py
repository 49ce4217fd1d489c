"""`tokenmill-appliance program NAME`: the wrapper supervisord runs for each program (spec section 5).

Every wrapper: tees its output raw to `<log dir>/NAME.log` and stdout; waits while `/.provisioning`
exists; exits 0 with one log line when its app is not configured (EXITED, never restarted); and on a
crash exits non-zero so supervisord restarts it, the next start waiting out a growing back-off.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

from tokenmill_appliance import provisioning as prov
from tokenmill_appliance.portal_apps import load_apps
from tokenmill_appliance.programs.commands import BUILDERS, Launch, Skip
from tokenmill_appliance.programs.runner import (
    Backoff,
    StopFlag,
    Tee,
    display_command,
    exit_status,
    run_child,
)
from tokenmill_appliance.settings import Settings, SettingsError, atomic_write_text
from tokenmill_appliance.venv_backup import BACKUP_INTERVAL_S, backup_venv

PROVISIONING_POLL_S = 1.0
NAMES = (*BUILDERS, "venv_backup", "provisioning")


def wait_for_provisioning(settings: Settings, tee: Tee, stop: StopFlag) -> None:
    marker = settings.provisioning_marker
    if marker.exists():
        tee.line(f"waiting for provisioning to finish ({marker} exists)")
        while marker.exists() and not stop.wait(PROVISIONING_POLL_S):
            pass


def wait_out_backoff(backoff: Backoff, tee: Tee, stop: StopFlag) -> bool:
    """Wait the back-off of earlier crashes; False when stopped meanwhile."""
    delay = backoff.delay()
    if delay:
        tee.line(f"restarting after {backoff.failures} crash(es): waiting {delay:.0f}s first")
        if stop.wait(delay):
            backoff.clear()  # a manual restart starts at once
            return False
    return True


def run_launch(launch: Launch, backoff: Backoff, tee: Tee, stop: StopFlag) -> int:
    """Run a launch once; the wrapper's exit status (non-zero after a crash, which `backoff` counts)."""
    env = {**os.environ, **launch.env}
    for note in launch.notes:
        tee.line(note)
    tee.line(f"starting: {display_command(launch.command)}")
    started = time.monotonic()
    returncode = run_child(launch.command, tee, stop, env=env, cwd=launch.cwd)
    if returncode == 0 and launch.hold and not stop.is_set:
        stop.wait()
    if launch.on_exit:
        run_child(launch.on_exit, tee, StopFlag(), env=env, cwd=launch.cwd)
    if stop.is_set or returncode == 0:
        backoff.clear()
        tee.line("stopped" if stop.is_set else "exited")
        return 0
    ran_s = time.monotonic() - started
    failures = backoff.record_crash(ran_s)
    tee.line(f"{_describe(returncode)} after {ran_s:.1f}s (crash {failures}); supervisord restarts it")
    return exit_status(returncode)


def _describe(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def run_venv_backup(settings: Settings, tee: Tee, stop: StopFlag) -> int:
    if settings.venv_backup_count <= 0:
        tee.line("VENV_BACKUP_COUNT=0: venv backups are disabled")
        return 0
    backup_dir = settings.venv_backup_dir
    tee.line(f"backing up `pip freeze` to {backup_dir} every {BACKUP_INTERVAL_S // 60} min")
    while not stop.is_set:
        try:
            path = backup_venv(backup_dir, settings.venv_backup_count)
            tee.line(f"wrote {path}")
        except (OSError, RuntimeError) as exc:
            tee.line(f"venv backup failed: {exc}")
        stop.wait(BACKUP_INTERVAL_S)
    return 0


def run_provisioning(settings: Settings, tee: Tee, stop: StopFlag) -> int:
    returncode = 1
    try:
        script = prov.fetch_script(settings)
        tee.line(f"running PROVISIONING_SCRIPT {prov.display_source(settings.provisioning_script)}")
        # The script sees WORKSPACE resolved under TOKENMILL_ROOT, the directory it runs in.
        env = {**os.environ, "WORKSPACE": str(settings.workspace)}
        returncode = run_child(prov.provisioning_command(script), tee, stop, env=env, cwd=settings.workspace)
    except (OSError, prov.ProvisioningError) as exc:
        tee.line(str(exc))
    finally:
        prov.finish_provisioning(settings, returncode)
    if returncode == 0:
        tee.line("provisioning succeeded; it will not run again on this machine")
    else:
        tee.line(f"provisioning failed (status {returncode}); the appliance starts anyway")
    return 0 if returncode == 0 else 1


class TeeHandler(logging.Handler):
    """The appliance's warnings and errors as lines of the program's log."""

    def __init__(self, tee: Tee) -> None:
        super().__init__(logging.WARNING)
        self.tee = tee

    def emit(self, record: logging.LogRecord) -> None:
        self.tee.line(record.getMessage())


def run_program(name: str, settings: Settings, tee: Tee, stop: StopFlag) -> int:
    if name == "provisioning":
        return run_provisioning(settings, tee, stop)
    wait_for_provisioning(settings, tee, stop)
    backoff = Backoff(settings.run_state_dir / f"{name}.backoff")
    if stop.is_set or not wait_out_backoff(backoff, tee, stop):
        return 0
    try:
        if name == "venv_backup":
            return run_venv_backup(settings, tee, stop)
        launch = BUILDERS[name](settings, load_apps(settings))
        if isinstance(launch, Skip):
            backoff.clear()
            tee.line(launch.reason)
            atomic_write_text(settings.skip_note(name), launch.reason + "\n")
            return 0
        settings.skip_note(name).unlink(missing_ok=True)
        return run_launch(launch, backoff, tee, stop)
    except SettingsError as exc:  # a malformed PORTAL_CONFIG or setting: its message says what to fix
        failures = backoff.record_crash(0.0)
        tee.line(f"configuration error (crash {failures}): {exc}")
        return 1
    except Exception:
        # Counted like a crash, so a persistent error backs off instead of looping at full speed.
        failures = backoff.record_crash(0.0)
        tee.line(f"wrapper error (crash {failures}):\n{traceback.format_exc()}")
        return 1


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in NAMES:
        print(f"usage: tokenmill-appliance program {{{','.join(NAMES)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    tee = Tee(name, settings.log_dir / f"{name}.log")
    logging.getLogger("tokenmill_appliance").addHandler(TeeHandler(tee))  # e.g. "ignoring portal.yaml"
    try:
        with StopFlag().installed() as stop:
            return run_program(name, settings, tee, stop)
    finally:
        tee.close()
