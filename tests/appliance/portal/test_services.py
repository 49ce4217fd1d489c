"""Services against a real supervisord: list, start/stop/restart, protected programs refuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tokenmill_appliance.portal.services import (
    ProgramControl,
    ProtectedProgramError,
    SupervisorError,
    UnknownProgramError,
)

from .conftest import TOKEN, StartPortal

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-Portal-Request": "1"}


async def test_client_controls_programs(tmp_path: Path, supervisord: Callable[[Path], None]) -> None:
    socket_path = tmp_path / "s.sock"
    supervisord(socket_path)
    client = ProgramControl(socket_path)
    programs = {p["name"]: p for p in await client.programs()}
    assert set(programs) == {"sleeper", "portal"}
    assert programs["sleeper"]["state"] == "RUNNING" and programs["sleeper"]["pid"]
    assert programs["portal"]["is_protected"] and not programs["sleeper"]["is_protected"]

    stopped = await client.control("sleeper", "stop")
    assert stopped["state"] == "STOPPED" and stopped["pid"] is None
    started = await client.control("sleeper", "start")
    assert started["state"] == "RUNNING"
    restarted = await client.control("sleeper", "restart")
    assert restarted["state"] == "RUNNING" and restarted["pid"] != started["pid"]

    with pytest.raises(ProtectedProgramError):
        await client.control("portal", "stop")
    with pytest.raises(ProtectedProgramError):
        await client.control("portal", "restart")
    with pytest.raises(UnknownProgramError):
        await client.control("nope", "start")


async def test_client_without_supervisord(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="not running"):
        await ProgramControl(tmp_path / "missing.sock").programs()


async def test_services_api(
    start_portal: StartPortal, supervisord: Callable[[Path], None], client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    base = p.url(p.portal_port, "/api/services")
    async with client.get(base, headers=HEADERS) as response:
        assert response.status == 503
        assert "supervisord is not running" in (await response.json())["error"]
    supervisord(p.settings.supervisor_socket)
    async with client.get(base, headers=HEADERS) as response:
        before = {x["name"]: x for x in (await response.json())["programs"]}
    async with client.post(f"{base}/sleeper/restart", headers=HEADERS) as response:
        assert response.status == 200
        after = (await response.json())["program"]
    assert after["state"] == "RUNNING" and after["pid"] != before["sleeper"]["pid"]
    async with client.post(f"{base}/portal/stop", headers=HEADERS) as response:
        assert response.status == 403
    async with client.post(f"{base}/sleeper/explode", headers=HEADERS) as response:
        assert response.status == 404
    # A browser's credentials (the cookie, cached basic auth) ride along on cross-site form posts: those
    # calls need the custom header. A Bearer token cannot be sent that way: API clients need no header.
    cookie_only = {"Cookie": f"portal_auth_token={TOKEN}"}
    async with client.post(f"{base}/sleeper/stop", headers=cookie_only) as response:
        assert response.status == 403
    bearer_only = {"Authorization": HEADERS["Authorization"]}
    async with client.post(f"{base}/sleeper/stop", headers=bearer_only) as response:
        assert response.status == 200
    async with client.post(f"{base}/sleeper/stop") as response:
        assert response.status == 401
