"""venv backups: real `pip freeze`, rotation to VENV_BACKUP_COUNT, 0 disables, the program's loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tokenmill_appliance.venv_backup import LATEST_NAME, backup_venv, pip_freeze, rotate, stamped_backups

REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 1, 2, 3, 4)


def test_pip_freeze_lists_this_environment() -> None:
    lines = pip_freeze().splitlines()
    assert any(line.lower().startswith(("pyyaml==", "pyyaml @")) for line in lines)


@pytest.mark.parametrize("keep", [1, 3, 5])
def test_rotation_keeps_exactly_the_newest(tmp_path: Path, keep: int) -> None:
    for i in range(7):
        backup_venv(tmp_path, keep, freeze=f"pkg=={i}\n", now=START + timedelta(minutes=30 * i))
    backups = stamped_backups(tmp_path)
    assert len(backups) == keep
    expected = [
        f"venv-main-{(START + timedelta(minutes=30 * i)):%Y-%m-%d-%H%M}.txt" for i in range(7 - keep, 7)
    ]
    assert [p.name for p in backups] == expected
    assert backups[-1].read_text() == "pkg==6\n"
    assert (tmp_path / LATEST_NAME).read_text() == "pkg==6\n"


def test_zero_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "backups"
    assert backup_venv(target, 0, freeze="x==1\n", now=START) is None
    assert not target.exists()


def test_rotation_leaves_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for i in range(3):
        backup_venv(tmp_path, 3, freeze="a==1\n", now=START + timedelta(days=i))
    deleted = rotate(tmp_path, 1)
    assert len(deleted) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LATEST_NAME, f"venv-main-{START + timedelta(days=2):%Y-%m-%d-%H%M}.txt", "notes.txt"]
    )


def _program_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VENV_", "SUPERVISOR_"))}
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return {**env, "TOKENMILL_ROOT": str(root), "PYTHONPATH": pythonpath, "CONTAINER_ID": "c1", **extra}


def _wrapper(root: Path, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenmill_appliance.cli", "program", "venv_backup"],
        env=_program_env(root, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_program_disabled_by_zero(tmp_path: Path) -> None:
    proc = _wrapper(tmp_path, VENV_BACKUP_COUNT="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "VENV_BACKUP_COUNT=0" in out
    assert "VENV_BACKUP_COUNT=0" in (tmp_path / "var/log/portal/venv_backup.log").read_text()
    assert not (tmp_path / "workspace/.venv-backups").exists()


def test_program_backs_up_at_start_and_stops_on_term(tmp_path: Path) -> None:
    proc = _wrapper(tmp_path, VENV_BACKUP_COUNT="2")
    backup_dir = tmp_path / "workspace/.venv-backups/c1"
    try:
        deadline = time.monotonic() + 60
        while not (backup_dir / LATEST_NAME).exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        assert len(stamped_backups(backup_dir)) == 1
        assert "pyyaml" in (backup_dir / LATEST_NAME).read_text().lower()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "wrote" in out
