"""The log dir: safe names, tails, trimming, the zip, and the live stream through the edge."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import aiohttp
import pytest

from tokenmill_appliance.portal.logs import (
    TAIL_LINES,
    LogPathError,
    list_logs,
    resolve_log_file,
    tail_bytes,
    trim_file,
    zip_logs,
)

from .conftest import TOKEN, StartPortal

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "../x.log",
        "/etc/passwd",
        "/var/log/portal/vllm.log",
        "a/b.log",
        ".hidden.log",
        "vllm.txt",
        "",
    ],
)
def test_names_outside_the_log_dir_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(LogPathError):
        resolve_log_file(tmp_path, name)


def test_directories_fifos_and_overlong_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.log").mkdir()
    os.mkfifo(tmp_path / "fifo.log")  # reading it would hang a worker
    for name in ("dir.log", "fifo.log", "a" * 300 + ".log"):
        with pytest.raises(LogPathError):
            resolve_log_file(tmp_path, name)


def test_symlink_out_of_the_log_dir_is_refused(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (log_dir / "evil.log").symlink_to(tmp_path / "secret.txt")
    (log_dir / "vllm.log").write_text("ok\n")
    with pytest.raises(LogPathError):
        resolve_log_file(log_dir, "evil.log")
    assert [f["name"] for f in list_logs(log_dir)] == ["vllm.log"]


def test_a_log_swapped_for_a_symlink_after_its_check_is_not_read_or_trimmed(tmp_path: Path) -> None:
    # The log dir is 1777: a user who owns a checked log can replace it with a link to a root-only file.
    log_dir, secret = tmp_path / "logs", tmp_path / "secret.txt"
    log_dir.mkdir()
    secret.write_bytes(b"SECRET\n" * 1_000_000)  # over the trim threshold
    (log_dir / "race.log").write_text("mine\n")
    checked = resolve_log_file(log_dir, "race.log")
    (log_dir / "race.tmp").symlink_to(secret)
    (log_dir / "race.tmp").rename(checked)
    with pytest.raises(LogPathError):
        tail_bytes(checked)
    with pytest.raises(LogPathError):
        trim_file(checked)
    assert secret.stat().st_size == 7_000_000


def test_tail_is_the_last_750_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    data, offset = tail_bytes(path)
    lines = data.decode().splitlines()
    assert len(lines) == TAIL_LINES
    assert lines[0] == "line 250" and lines[-1] == "line 999"
    assert offset == path.stat().st_size


def test_trim_keeps_the_last_megabyte_and_appends_continue(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    line = b"x" * 99 + b"\n"
    with path.open("wb") as f:
        for _ in range(60_000):  # 6 MB
            f.write(line)
        f.write(b"the end\n")
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert trim_file(path)
        os.write(writer, b"after trim\n")
    finally:
        os.close(writer)
    data = path.read_bytes()
    assert 1_000_000 < len(data) <= 1024 * 1024 + 20
    assert data.endswith(b"the end\nafter trim\n")
    assert data.startswith(b"x")
    assert not trim_file(path)


def test_zip_holds_the_log_dir_only(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    (log_dir / "sub").mkdir(parents=True)
    (log_dir / "vllm.log").write_text("engine\n")
    (log_dir / "sub/inner.log").write_text("nested\n")
    (tmp_path / "outside.log").write_text("outside\n")
    (log_dir / "link.log").symlink_to(tmp_path / "outside.log")
    with zipfile.ZipFile(io.BytesIO(zip_logs(log_dir))) as archive:
        assert archive.namelist() == ["vllm.log"]
        assert archive.read("vllm.log") == b"engine\n"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_logs_api_refuses_escapes(start_portal: StartPortal, client: aiohttp.ClientSession) -> None:
    p = await start_portal()
    (p.settings.log_dir / "vllm.log").write_text("hello\n")
    (p.settings.root / "secret.log").write_text("TOP-SECRET-CONTENT\n")
    base = p.url(p.ui_port)
    for name in ["..%2Fsecret.log", "%2Fetc%2Fpasswd", "..%2F..%2Fsecret.log"]:
        async with client.get(f"{base}api/logs/{name}", headers=BEARER) as response:
            assert response.status == 400, name
            assert "TOP-SECRET" not in await response.text()
    for name in ["../secret.log", "/etc/passwd", str(p.settings.root / "secret.log")]:
        async with client.get(f"{base}api/logs/stream", params={"file": name}, headers=BEARER) as response:
            assert response.status == 400, name
    async with client.get(f"{base}api/logs/vllm.log", headers=BEARER) as response:
        assert await response.text() == "hello\n"
    async with client.get(f"{base}api/logs/download", headers=BEARER) as response:
        with zipfile.ZipFile(io.BytesIO(await response.read())) as archive:
            assert archive.namelist() == ["vllm.log"]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_log_stream_sends_tail_then_appends(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    path = p.settings.log_dir / "vllm.log"
    path.write_text("".join(f"old {i}\n" for i in range(800)))
    url = p.url(p.portal_port, "/api/logs/stream?file=vllm.log").replace("http", "ws", 1)
    async with client.ws_connect(url, headers=BEARER) as ws:
        first = json.loads((await ws.receive(timeout=5)).data)
        assert first["type"] == "init"
        assert first["text"].splitlines()[0] == "old 50" and len(first["text"].splitlines()) == 750
        with path.open("a") as f:
            f.write("progress 10%\rprogress 100%\nnew line <b>\n")
        appended = json.loads((await ws.receive(timeout=5)).data)
        assert appended == {"type": "append", "text": "progress 10%\rprogress 100%\nnew line <b>\n"}
        path.write_text("after truncation\n")
        again = json.loads((await ws.receive(timeout=5)).data)
        assert again["type"] == "init" and again["text"] == "after truncation\n"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(url, headers={**BEARER, "Origin": "http://evil.example"}):
            pass
    assert refused.value.status == 403


@pytest.mark.slow
@pytest.mark.asyncio
async def test_log_stream_follows_the_file_it_opened_not_the_name(
    start_portal: StartPortal, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    p = await start_portal()
    path = p.settings.log_dir / "race.log"
    path.write_text("mine\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET\n")
    url = p.url(p.portal_port, "/api/logs/stream?file=race.log").replace("http", "ws", 1)
    async with client.ws_connect(url, headers=BEARER) as ws:
        assert json.loads((await ws.receive(timeout=5)).data)["text"] == "mine\n"
        (p.settings.log_dir / "race.tmp").symlink_to(secret)
        (p.settings.log_dir / "race.tmp").rename(path)
        message = json.loads((await ws.receive(timeout=5)).data)
        assert message == {"type": "error", "text": "race.log was removed"}
