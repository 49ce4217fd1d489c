"""venv backups: `pip freeze` of the active environment, newest VENV_BACKUP_COUNT kept (spec section 6).

Files are `<dir>/venv-main-YYYY-MM-DD-HHMM.txt` plus a copy named `venv-main-latest.txt`, so a user can
rebuild a lost environment with `pip install -r venv-main-latest.txt`.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tokenmill_appliance.settings import atomic_write_text

logger = logging.getLogger(__name__)

BACKUP_INTERVAL_S = 30 * 60
LATEST_NAME = "venv-main-latest.txt"
_STAMPED = re.compile(r"^venv-main-\d{4}-\d{2}-\d{2}-\d{4}\.txt$")


def pip_freeze(python: str = sys.executable) -> str:
    """The requirements of `python`'s environment, as `pip freeze` prints them."""
    result = subprocess.run(
        [python, "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip freeze failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout


def stamped_backups(backup_dir: Path) -> list[Path]:
    """The dated backups in `backup_dir`, oldest first (the names sort by time)."""
    if not backup_dir.is_dir():
        return []
    return sorted(p for p in backup_dir.iterdir() if _STAMPED.match(p.name))


def rotate(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` dated backups; returns the deleted paths."""
    backups = stamped_backups(backup_dir)
    doomed = backups[: max(len(backups) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def backup_venv(
    backup_dir: Path, keep: int, freeze: str | None = None, now: datetime | None = None
) -> Path | None:
    """Write one backup (and the `latest` copy), then rotate to `keep`. `keep` <= 0 writes nothing.

    Two backups in the same minute share a name; the later one replaces the earlier.
    """
    if keep <= 0:
        return None
    text = pip_freeze() if freeze is None else freeze
    stamp = (now or datetime.now()).strftime("%Y-%m-%d-%H%M")
    path = backup_dir / f"venv-main-{stamp}.txt"
    atomic_write_text(path, text)
    atomic_write_text(backup_dir / LATEST_NAME, text)
    rotate(backup_dir, keep)
    return path
