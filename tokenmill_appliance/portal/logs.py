"""The log dir: listing, safe file lookup, tails, live follow over WebSocket, trimming, zip download.

Only `*.log` files directly inside the log dir are ever read; a name with a path separator, a leading dot
or a target outside the dir (a symlink) is refused. Every file is opened by `open_log`, which does not
follow a symlink: the dir is writable by every user (1777), so a file checked by name could be swapped
for a symlink to a file only root may read before the portal (root) opens it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import io
import logging
import os
import stat
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

logger = logging.getLogger(__name__)

TAIL_LINES = 750
TRIM_ABOVE_BYTES = 5 * 1024 * 1024
TRIM_TO_BYTES = 1024 * 1024
FOLLOW_INTERVAL_S = 0.25
READ_CHUNK_BYTES = 256 * 1024


class LogPathError(ValueError):
    """A log name that is not a `*.log` file directly inside the log dir."""


def resolve_log_file(log_dir: Path, name: str) -> Path:
    """The path of log `name`, or LogPathError when it could lead outside the log dir."""
    bad = not name or "/" in name or "\\" in name or "\x00" in name or name.startswith(".")
    if bad or not name.endswith(".log"):
        raise LogPathError(f"{name!r} is not a log file name (expected NAME.log inside the log dir)")
    root = log_dir.resolve()
    try:
        path = (root / name).resolve()
        is_special = path.exists() and not path.is_file()  # a directory or a FIFO would hang or fail a read
    except OSError as exc:  # e.g. a name too long for the file system
        raise LogPathError(f"{name[:80]!r} cannot be a log file: {exc.strerror}") from None
    if path.parent != root:
        raise LogPathError(f"{name!r} points outside the log dir")
    if is_special:
        raise LogPathError(f"{name!r} is not a regular file")
    return path


def open_log(path: Path, writable: bool = False) -> BinaryIO:
    """`path` (from `resolve_log_file`) opened only if it is still a regular file, not a symlink."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LogPathError(f"{path.name!r} became a symlink") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogPathError(f"{path.name!r} is not a regular file")
    return os.fdopen(fd, "r+b" if writable else "rb")


def list_logs(log_dir: Path) -> list[dict[str, Any]]:
    """The `*.log` files of the log dir, by name, with size and modification time."""
    files = []
    for path in sorted(log_dir.glob("*.log")):
        try:
            resolve_log_file(log_dir, path.name)
            stat = path.stat()
        except (LogPathError, OSError):
            continue
        if path.is_file():
            files.append({"name": path.name, "size": stat.st_size, "mtime": stat.st_mtime})
    return files


def tail_bytes(path: Path, num_lines: int = TAIL_LINES, limit: int = TRIM_TO_BYTES) -> tuple[bytes, int]:
    """The last `num_lines` lines (at most `limit` bytes) and the file offset they end at."""
    with open_log(path) as f:
        return _tail(f, num_lines, limit)


def _tail(f: BinaryIO, num_lines: int = TAIL_LINES, limit: int = TRIM_TO_BYTES) -> tuple[bytes, int]:
    end = f.seek(0, os.SEEK_END)
    start = max(0, end - limit)
    f.seek(start)
    data = f.read(end - start)
    if start > 0:
        data = data[data.find(b"\n") + 1 :]
    lines = data.split(b"\n")
    # A trailing newline leaves an empty last piece: it does not count as a line.
    keep = num_lines + 1 if data.endswith(b"\n") else num_lines
    return b"\n".join(lines[-keep:]), end


def trim_file(path: Path, above: int = TRIM_ABOVE_BYTES, keep: int = TRIM_TO_BYTES) -> bool:
    """Cut a file over `above` bytes down to its last `keep` bytes, in place, so writers that append
    (O_APPEND) keep writing to it. Returns whether it was trimmed."""
    with open_log(path, writable=True) as f:
        size = f.seek(0, os.SEEK_END)
        if size <= above:
            return False
        f.seek(size - keep)
        tail = f.read()
        newline = tail.find(b"\n")
        tail = tail[newline + 1 :] if 0 <= newline < len(tail) - 1 else tail
        f.seek(0)
        f.write(tail)
        f.truncate()
    return True


def trim_logs(log_dir: Path) -> list[str]:
    trimmed = []
    for item in list_logs(log_dir):
        if item["size"] > TRIM_ABOVE_BYTES:
            with contextlib.suppress(OSError, LogPathError):
                if trim_file(log_dir / item["name"]):
                    trimmed.append(item["name"])
    return trimmed


async def trim_forever(log_dir: Path, interval_s: float = 60.0) -> None:
    while True:
        trimmed = await asyncio.to_thread(trim_logs, log_dir)
        if trimmed:
            logger.info("trimmed log files over 5 MB to their last 1 MB: %s", ", ".join(trimmed))
        await asyncio.sleep(interval_s)


def zip_logs(log_dir: Path) -> bytes:
    """A zip of the log dir's own files (not its subdirectories, nothing outside it)."""
    buffer = io.BytesIO()
    root = log_dir.resolve()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(log_dir.iterdir()):
            resolved = path.resolve()
            if resolved.parent != root or not resolved.is_file():
                continue
            try:
                with open_log(resolved) as f:
                    modified = time.localtime(os.fstat(f.fileno()).st_mtime)[:6]
                    entry = zipfile.ZipInfo(path.name, modified)
                    archive.writestr(entry, f.read(), zipfile.ZIP_DEFLATED)
            except (OSError, LogPathError):  # removed or swapped since the listing
                continue
    return buffer.getvalue()


def _read_from(f: BinaryIO, offset: int) -> tuple[bytes, int]:
    f.seek(offset)
    data = f.read(READ_CHUNK_BYTES)
    return data, offset + len(data)


async def follow(ws: web.WebSocketResponse, name: str, f: BinaryIO) -> None:
    """Send the tail of log `name` (open as `f`, from `open_log`), then everything appended, until the
    client goes away.

    Messages are JSON: `{"type": "init", "text": ...}` first (and again after the file was trimmed or
    truncated), then `{"type": "append", "text": ...}`. The file is followed by its descriptor, so a
    name swapped for another file afterwards changes nothing.
    """
    data, offset = await asyncio.to_thread(_tail, f)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    await ws.send_json({"type": "init", "name": name, "text": decoder.decode(data)})
    closed = asyncio.create_task(ws.receive())
    try:
        while not ws.closed:
            done, _ = await asyncio.wait({closed}, timeout=FOLLOW_INTERVAL_S)
            if done:
                return
            info = os.fstat(f.fileno())
            if info.st_nlink == 0:
                await ws.send_json({"type": "error", "text": f"{name} was removed"})
                return
            if info.st_size < offset:
                data, offset = await asyncio.to_thread(_tail, f)
                decoder.reset()
                await ws.send_json({"type": "init", "name": name, "text": decoder.decode(data)})
            elif info.st_size > offset:
                data, offset = await asyncio.to_thread(_read_from, f, offset)
                await ws.send_json({"type": "append", "text": decoder.decode(data)})
    finally:
        closed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closed
