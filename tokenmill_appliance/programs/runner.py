"""What every program wrapper shares: the tee, the child process, stop signals and crash back-off."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import BinaryIO

_SECRET_FLAG = re.compile(r"^--?[\w-]*(key|token|secret|password)[\w-]*$", re.IGNORECASE)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MAX_BACKOFF_S = 60.0
STABLE_RUN_S = 60.0
"""A child that ran this long before crashing starts the back-off over."""
DRAIN_GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1


class Tee:
    """Raw output to `<log dir>/<name>.log`, to stdout (supervisord's capture) and to the console.

    The console is supervisord's own stdout (the container's log), reached through /proc, so
    `docker logs` shows every program while `supervisorctl tail` still reads a real file.
    """

    def __init__(self, name: str, log_file: Path) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._sinks: list[BinaryIO] = []
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._sinks.append(log_file.open("ab", buffering=0))
        self._sinks.append(sys.stdout.buffer)
        console = _open_console()
        if console is not None:
            self._sinks.append(console)

    def write(self, data: bytes) -> None:
        with self._lock:
            for sink in self._sinks:
                try:
                    sink.write(data)
                    sink.flush()
                except (OSError, ValueError):
                    pass

    def line(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"[{stamp}] {self.name}: {text}\n".encode())

    def close(self) -> None:
        for sink in self._sinks:
            if sink is not sys.stdout.buffer:
                sink.close()


def _open_console() -> BinaryIO | None:
    if "SUPERVISOR_ENABLED" not in os.environ or os.environ.get("TOKENMILL_CONSOLE") == "0":
        return None
    console = f"/proc/{os.getppid()}/fd/1"
    try:
        # Only a pipe, socket or terminal: a regular file has supervisord's own offset, which would
        # overwrite what we append.
        if stat.S_ISREG(os.stat(console).st_mode):
            return None
        fd = os.open(console, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    return os.fdopen(fd, "wb", buffering=0)


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP (supervisord's stop); passed on to the running child.

    A plain flag polled by `wait`, not a threading.Event: Event.set takes a lock, and a signal handler
    that runs while the main thread holds that lock would deadlock.
    """

    POLL_S = 0.2

    def __init__(self) -> None:
        self._is_set = False
        self.child: subprocess.Popen[bytes] | None = None

    @property
    def is_set(self) -> bool:
        return self._is_set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until stopped or `timeout` passed (forever when None); True when stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._is_set:
            left = self.POLL_S if deadline is None else min(self.POLL_S, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self._is_set

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self._is_set
        self._is_set = True
        child = self.child
        # supervisord signals the whole group, but a plain `kill <wrapper pid>` must reach the child too.
        if first and child is not None and child.poll() is None:
            child.send_signal(signum)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _die_with_parent() -> None:
    # If the wrapper is SIGKILLed the child gets SIGTERM instead of holding the port as an orphan.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _pump(stream: BinaryIO, tee: Tee) -> None:
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        tee.write(chunk)


def run_child(
    command: list[str],
    tee: Tee,
    stop: StopFlag,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Run `command` with its output tee'd; returns its exit status (negative: killed by that signal)."""
    if stop.is_set:
        return 0
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )
    except OSError as exc:
        tee.line(f"cannot start {command[0]}: {exc}")
        return 127
    stop.child = child
    assert child.stdout is not None
    pump = threading.Thread(target=_pump, args=(child.stdout, tee), daemon=True)
    pump.start()
    returncode = child.wait()
    # Daemons the child left behind may keep the pipe open; stop waiting for their output after a grace.
    pump.join(DRAIN_GRACE_S)
    if not pump.is_alive():
        child.stdout.close()
    stop.child = None
    return returncode


def display_command(command: list[str]) -> str:
    """The command for a log line, values of flags like --api-key or --hf-token masked."""
    shown: list[str] = []
    for word in command:
        flag, eq, _ = word.partition("=")
        if shown and shown[-1] != "********" and _SECRET_FLAG.match(shown[-1]):
            word = "********"
        elif eq and _SECRET_FLAG.match(flag):
            word = f"{flag}=********"
        shown.append(word)
    return shlex.join(shown)


def exit_status(returncode: int) -> int:
    """A wrapper exit status for a child status: non-zero stays non-zero, signals become 128+N."""
    if returncode < 0:
        return 128 - returncode
    return min(returncode, 255)


class Backoff:
    """Consecutive quick crashes of one program, kept in a file since each crash ends the wrapper.

    supervisord restarts a crashed wrapper at once (it backs off only while a program is STARTING), so
    the new wrapper waits 1, 2, 4 ... up to 60 s before starting the child again.
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file

    @property
    def failures(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text(encoding="utf-8"))["failures"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def delay(self) -> float:
        failures = self.failures
        return 0.0 if failures <= 0 else min(2.0 ** (failures - 1), MAX_BACKOFF_S)

    def record_crash(self, ran_s: float) -> int:
        failures = self.failures + 1 if ran_s < STABLE_RUN_S else 1
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"failures": failures, "at": time.time()}), encoding="utf-8")
        return failures

    def clear(self) -> None:
        self.state_file.unlink(missing_ok=True)
