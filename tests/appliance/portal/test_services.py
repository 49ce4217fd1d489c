"""Services against a real supervisord: list, start/stop/restart, protected programs refuse."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tokenmill_appliance.portal.services import (
    ProgramControl,
    ProtectedProgramError,
    SupervisorError,
    UnknownProgramError,
    describe,
)

from .conftest import PASSWORD, TOKEN, StartPortal

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-Portal-Request": "1"}


async def test_client_controls_programs(tmp_path: Path, supervisord: Callable[[Path], None]) -> None:
    socket_path = tmp_path / "s.sock"
    supervisord(socket_path)
    client = ProgramControl(socket_path)
    programs = {p["name"]: p for p in await client.programs()}
    assert set(programs) == {"sleeper", "portal", "skipper"}
    assert programs["skipper"]["state"] == "EXITED" and programs["skipper"]["exit_status"] == 0
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
    for odd in ("portal%00", "sleeper%0A", "no%20such"):
        async with client.post(f"{base}/{odd}/stop", headers=HEADERS) as response:
            assert response.status == 404 and "no program" in (await response.json())["error"]
    # A browser's credentials (the cookie, cached basic auth) ride along on cross-site form posts: a call
    # a browser marks as another site's is refused. Same-site calls, non-browser clients (no
    # Sec-Fetch-Site, no Origin) and Bearer tokens (a form post cannot carry one) go through.
    cookie = {"Cookie": f"portal_auth_token={TOKEN}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"vastai:{PASSWORD}".encode()).decode()}
    cross_site = [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
    ]
    for refused in cross_site:
        async with client.post(f"{base}/sleeper/stop", headers={**cookie, **refused}) as response:
            assert response.status == 403, refused
            assert "another site" in (await response.json())["error"]
        async with client.post(f"{base}/sleeper/stop", headers={**refused, **basic}) as response:
            assert response.status == 403, refused
    host = f"127.0.0.1:{p.portal_port}"
    for allowed in ({}, {"Sec-Fetch-Site": "same-origin"}, {"Origin": f"http://{host}"}):
        async with client.post(f"{base}/sleeper/start", headers={**cookie, **allowed}) as response:
            assert response.status == 200, allowed
        async with client.post(f"{base}/sleeper/start", headers={**allowed, **basic}) as response:
            assert response.status == 200, allowed
    bearer_cross_site = {"Authorization": HEADERS["Authorization"], "Sec-Fetch-Site": "cross-site"}
    async with client.post(f"{base}/sleeper/stop", headers=bearer_cross_site) as response:
        assert response.status == 200
    async with client.post(f"{base}/sleeper/stop") as response:
        assert response.status == 401


async def test_services_api_with_auth_off_needs_no_header(
    start_portal: StartPortal, supervisord: Callable[[Path], None], client: aiohttp.ClientSession
) -> None:
    p = await start_portal(ENABLE_AUTH="false")
    supervisord(p.settings.supervisor_socket)
    base = p.url(p.portal_port, "/api/services")
    async with client.post(f"{base}/sleeper/restart") as response:
        assert response.status == 200
        assert (await response.json())["program"]["state"] == "RUNNING"
    async with client.post(f"{base}/portal/stop") as response:
        assert response.status == 403
        assert "cannot be stopped from here" in (await response.json())["error"]
    # No credentials to ride along, but a page on another site could still drive an open dashboard.
    async with client.post(f"{base}/sleeper/stop", headers={"Sec-Fetch-Site": "cross-site"}) as response:
        assert response.status == 403
        assert "another site" in (await response.json())["error"]
    async with client.post(f"{base}/sleeper/stop", headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 403


def process_info(state: str, exit_status: int, name: str = "jupyter") -> dict[str, object]:
    """What supervisord's getProcessInfo returns for a program that has exited (the fields used)."""
    return {
        "group": name,
        "name": name,
        "statename": state,
        "pid": 0,
        "now": 10,
        "start": 5,
        "exitstatus": exit_status,
    }


@pytest.mark.parametrize(
    ("state", "exit_status", "noted", "skipped"),
    [
        ("EXITED", 0, True, "'Jupyter' is not in portal.yaml"),  # its wrapper skipped it
        ("EXITED", 0, False, None),  # it ran and finished
        ("EXITED", 1, True, None),  # it failed after an earlier skip
        ("RUNNING", 0, True, None),  # configured since, and started
    ],
)
async def test_a_skipped_program_is_told_from_a_failed_one(
    tmp_path: Path, state: str, exit_status: int, noted: bool, skipped: str | None
) -> None:
    def skip_note(name: str) -> Path:
        return tmp_path / f"{name}.skipped"

    if noted:
        skip_note("jupyter").write_text("'Jupyter' is not in portal.yaml\n")
    shown = describe(process_info(state, exit_status), skip_note)
    assert shown["skipped"] == skipped
    assert shown["exit_status"] == (exit_status if state == "EXITED" else None)
