"""Tunnel start/list/refresh/stop/timeout logic, driven by a cloudflared STAND-IN script.

There is no internet here and no real cloudflared: the stand-in prints what cloudflared prints around a
quick tunnel's URL (or never prints one), so only the manager's process handling and URL parsing are
tested, not Cloudflare.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tokenmill_appliance.portal.tunnels import (
    NAMED_TUNNEL_WARNING,
    QuickTunnelsOffError,
    TunnelError,
    TunnelManager,
    TunnelNotFoundError,
)

from .conftest import TOKEN, StartPortal

pytestmark = pytest.mark.asyncio
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-Portal-Request": "1"}
EDGE_PORTS = (1111, 8000)

STAND_IN = """#!/bin/sh
# cloudflared stand-in for tests (NOT the real cloudflared): records its arguments, prints a quick
# tunnel banner with a URL made from its pid, then runs until stopped.
echo "$@" > "{args_file}"
echo "TUNNEL_TOKEN=${{TUNNEL_TOKEN:-}}" >> "{args_file}"
echo "2026-01-01T00:00:00Z INF Requesting new quick Tunnel on trycloudflare.com..." >&2
sleep 0.2
echo "2026-01-01T00:00:00Z INF |  https://stand-in-$$.trycloudflare.com  |" >&2
exec sleep 600
"""

FAILING_STAND_IN = """#!/bin/sh
# cloudflared stand-in for tests (NOT the real cloudflared) that fails at once, as with a bad flag.
echo "2026-01-01T00:00:00Z ERR failed to connect: bad origin" >&2
exit 3
"""

SILENT_STAND_IN = """#!/bin/sh
# cloudflared stand-in for tests (NOT the real cloudflared) that never prints a tunnel URL.
echo "2026-01-01T00:00:00Z ERR failed to reach the edge" >&2
exec sleep 600
"""


def write_stand_in(tmp_path: Path, text: str) -> tuple[str, Path]:
    args_file = tmp_path / "args.txt"
    script = tmp_path / "cloudflared"
    script.write_text(text.format(args_file=args_file))
    script.chmod(0o755)
    return str(script), args_file


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def test_start_list_refresh_stop(tmp_path: Path) -> None:
    binary, args_file = write_stand_in(tmp_path, STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS)
    try:
        tunnel = await manager.start("https://localhost:1111")
        assert tunnel["public_url"] == f"https://stand-in-{tunnel['pid']}.trycloudflare.com"
        assert tunnel["state"] == "running"
        assert (
            args_file.read_text().splitlines()[0]
            == "--no-autoupdate --url https://localhost:1111 --no-tls-verify"
        )
        assert [t["id"] for t in manager.status()["tunnels"]] == [tunnel["id"]]

        refreshed = await manager.refresh(tunnel["id"])
        assert refreshed["id"] == tunnel["id"] and refreshed["public_url"] != tunnel["public_url"]
        assert not is_alive(tunnel["pid"])

        await manager.stop(tunnel["id"])
        assert manager.status()["tunnels"] == []
        assert not is_alive(refreshed["pid"])
        with pytest.raises(TunnelNotFoundError):
            await manager.stop(tunnel["id"])
    finally:
        await manager.close()


async def test_cloudflared_gets_none_of_the_portal_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "env.txt"
    binary, _ = write_stand_in(tmp_path, STAND_IN.replace('echo "$@" >', f'env > "{env_file}"; echo "$@" >'))
    for name in ("OPEN_BUTTON_TOKEN", "WEB_PASSWORD", "CF_TUNNEL_TOKEN", "VLLM_API_KEY"):
        monkeypatch.setenv(name, f"secret-of-{name}")
    monkeypatch.setenv("HARMLESS", "kept")
    manager = TunnelManager(binary, EDGE_PORTS)
    try:
        await manager.start("https://localhost:1111")
        seen = env_file.read_text()
        assert "secret-of-" not in seen and "HARMLESS=kept" in seen
    finally:
        await manager.close()


async def test_no_url_in_time_is_an_error_and_the_process_is_gone(tmp_path: Path) -> None:
    binary, _ = write_stand_in(tmp_path, SILENT_STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS, url_timeout_s=0.5)
    with pytest.raises(TunnelError, match="no tunnel URL within 0.5 s.*failed to reach the edge"):
        await manager.start("http://localhost:8000")
    assert manager.status()["tunnels"] == []
    await manager.close()


async def test_a_cloudflared_that_exits_says_so_at_once(tmp_path: Path) -> None:
    binary, _ = write_stand_in(tmp_path, FAILING_STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS, url_timeout_s=20)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TunnelError, match=r"cloudflared exited \(code 3\) .*: .*bad origin"):
        await manager.start("http://localhost:8000")
    assert asyncio.get_running_loop().time() - started < 20  # not the URL timeout
    assert manager.status()["tunnels"] == []


async def test_a_tunnel_stopped_while_it_starts_fails_its_start_cleanly(tmp_path: Path) -> None:
    binary, _ = write_stand_in(tmp_path, SILENT_STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS, url_timeout_s=20)
    # Repeated: the start wakes when the killed process's output ends, as the stop does; it once took the
    # stop for cloudflared exiting by itself in about one run of fifteen.
    for _ in range(20):
        start = asyncio.create_task(manager.start("http://localhost:8000"))
        while not manager.status()["tunnels"]:
            await asyncio.sleep(0.01)
        await manager.stop(manager.status()["tunnels"][0]["id"])
        with pytest.raises(TunnelError, match="stopped before cloudflared gave its URL"):
            await asyncio.wait_for(start, 10)
        assert manager.status()["tunnels"] == []
    await manager.close()


async def test_only_edge_ports_on_this_machine(tmp_path: Path) -> None:
    binary, _ = write_stand_in(tmp_path, STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS)
    bad_ports = ["http://localhost:99999", "http://localhost:abc", "http://[::1:8000"]
    for target in ["http://example.com:80", "file:///etc/passwd", "http://localhost", *bad_ports]:
        with pytest.raises(TunnelError, match="must be"):
            await manager.start(target)
    # An internal port (the model server behind the edge) would skip the portal's login.
    with pytest.raises(TunnelError, match=r"not one of the edge's ports \(1111, 8000\): .* portal's login"):
        await manager.start("http://localhost:18000")
    assert manager.status()["tunnels"] == []


async def test_without_cloudflared_says_so() -> None:
    manager = TunnelManager(None, EDGE_PORTS)
    assert manager.status()["message"] == "cloudflared is not installed on this machine"
    with pytest.raises(TunnelError, match="not installed"):
        await manager.start("http://localhost:8000")


async def test_named_tunnel_token_in_env_and_warning(tmp_path: Path) -> None:
    binary, args_file = write_stand_in(tmp_path, STAND_IN)
    manager = TunnelManager(binary, EDGE_PORTS, named_token="cf-secret")
    try:
        await manager.start_named()
        for _ in range(100):
            if args_file.exists() and "TUNNEL_TOKEN" in args_file.read_text():
                break
            await asyncio.sleep(0.05)
        lines = args_file.read_text().splitlines()
        assert lines == ["--no-autoupdate tunnel run", "TUNNEL_TOKEN=cf-secret"]
        assert manager.status()["named_warning"] == NAMED_TUNNEL_WARNING
        assert "BYPASSES" in NAMED_TUNNEL_WARNING
        await manager.stop("named")
        # Still configured: the warning stays, since starting it again is one click away.
        assert manager.status()["named_warning"] == NAMED_TUNNEL_WARNING
        assert manager.status()["named"]
        # Stopped from the dashboard, it can be started again; refresh restarts it.
        first = await manager.start_named()
        assert await manager.start_named() == first  # already running: the same process
        refreshed = await manager.refresh("named")
        assert refreshed["pid"] != first["pid"] and not is_alive(first["pid"])
        assert manager.status()["named_warning"] == NAMED_TUNNEL_WARNING
        # The named tunnel replaces quick tunnels (spec: "named Cloudflare tunnel instead of quick tunnels").
        with pytest.raises(QuickTunnelsOffError, match="CF_TUNNEL_TOKEN"):
            await manager.start("http://localhost:8000")
    finally:
        await manager.close()


@pytest.mark.slow
async def test_tunnels_api(tmp_path: Path, start_portal: StartPortal, client: aiohttp.ClientSession) -> None:
    binary, _ = write_stand_in(tmp_path, STAND_IN)
    p = await start_portal(cloudflared=binary)
    base = p.url(p.portal_port, "/api/tunnels")
    async with client.get(base, headers=HEADERS) as response:
        status = await response.json()
    assert status["available"] and status["tunnels"] == []
    assert {"name": "vLLM API", "target": f"http://localhost:{p.api_port}"} in status["targets"]
    async with client.post(
        base, json={"target": f"http://localhost:{p.api_port}"}, headers=HEADERS
    ) as response:
        assert response.status == 200
        tunnel = (await response.json())["tunnel"]
    assert tunnel["public_url"].endswith(".trycloudflare.com")
    # The dashboard's own internal port (behind the edge): a tunnel there would skip the login.
    internal = {"target": f"http://localhost:{p.ui_port}"}
    async with client.post(base, json=internal, headers=HEADERS) as response:
        assert response.status == 400
        assert "skip the portal's login" in (await response.json())["error"]
    async with client.post(f"{base}/{tunnel['id']}/stop", headers=HEADERS) as response:
        assert response.status == 200
    async with client.get(base, headers=HEADERS) as response:
        assert (await response.json())["tunnels"] == []
    async with client.post(f"{base}/{tunnel['id']}/stop", headers=HEADERS) as response:
        assert response.status == 404 and "no tunnel" in (await response.json())["error"]
    named = await start_portal(cloudflared=binary, CF_TUNNEL_TOKEN="cf-secret")
    named_base = named.url(named.portal_port, "/api/tunnels")
    async with client.post(f"{named_base}/named/stop", headers=HEADERS) as response:
        assert response.status == 200
    async with client.post(f"{named_base}/named/start", headers=HEADERS) as response:
        assert response.status == 200 and (await response.json())["tunnel"]["kind"] == "named"
    target = {"target": f"http://localhost:{named.api_port}"}
    async with client.post(named_base, json=target, headers=HEADERS) as response:
        assert response.status == 409 and "CF_TUNNEL_TOKEN" in (await response.json())["error"]
    plain = await start_portal()
    async with client.get(plain.url(plain.portal_port, "/api/tunnels"), headers=HEADERS) as response:
        status = await response.json()
    assert not status["available"] and "not installed" in status["message"]
