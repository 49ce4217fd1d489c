"""The dashboard's page and JSON API: behind the edge, and straight on the internal port."""

from __future__ import annotations

import asyncio

import aiohttp
import psutil
import pytest
from aiohttp import web

from .conftest import TOKEN, RunningPortal, StartPortal, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def apps_by_name(client: aiohttp.ClientSession, url: str, **kwargs: object) -> dict[str, dict]:
    async with client.get(url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status == 200
        return {app["name"]: app for app in (await response.json())["apps"]}


async def test_health_is_open_and_the_page_is_not(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    for url in (p.url(p.portal_port, "/health"), f"http://127.0.0.1:{p.ui_port}/health"):
        async with client.get(url) as response:
            assert response.status == 200 and (await response.json()) == {"status": "ok"}
    async with client.get(p.url(p.portal_port, "/"), headers=BEARER) as response:
        assert response.status == 200 and "tokenmill" in await response.text()
    async with client.get(p.url(p.portal_port, "/static/app.js"), headers=BEARER) as response:
        assert response.status == 200
    for url in (p.url(p.portal_port, "/api/apps"), f"http://127.0.0.1:{p.ui_port}/api/apps"):
        async with client.get(url) as response:
            assert response.status == 401


async def test_the_dashboard_cannot_be_framed_and_its_api_is_not_cached(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    for path in ("/", "/static/app.js", "/api/apps"):
        async with client.get(p.url(p.portal_port, path), headers=BEARER) as response:
            assert response.status == 200
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    async with client.get(p.url(p.portal_port, "/api/apps"), headers=BEARER) as response:
        assert response.headers["Cache-Control"] == "no-store"  # its links carry the token


async def test_internal_port_is_loopback_only_and_ignores_a_forged_edge_header(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    internal = f"http://127.0.0.1:{p.ui_port}/api/session"
    async with client.get(internal, headers={"X-Tokenmill-Edge": "guess authenticated"}) as response:
        assert response.status == 401
    async with client.get(internal, headers=BEARER) as response:
        assert (await response.json())["authenticated"] is True
    listening = psutil.Process().net_connections(kind="inet")
    assert {c.laddr.ip for c in listening if c.laddr.port == p.ui_port and c.status == "LISTEN"} == {
        "127.0.0.1"
    }


async def test_apps_list_status_model_and_links(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    apps = await apps_by_name(client, p.url(p.portal_port, "/api/apps"), headers=BEARER)
    assert list(apps) == ["Instance Portal", "vLLM API", "Jupyter", "Open App"]
    api = apps["vLLM API"]
    assert api["status"] == "up"
    assert api["engine"] == {"model": "SmolLM2-135M-Instruct", "health": "healthy"}
    assert api["url"] == f"http://127.0.0.1:{p.api_port}/docs?token={TOKEN}"
    assert apps["Jupyter"]["status"] == "down"
    assert apps["Open App"]["url"] == f"http://127.0.0.1:{p.open_port}/"


async def test_links_carry_no_token_for_an_unauthenticated_viewer(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal(AUTH_EXCLUDE="")
    open_p: RunningPortal = await start_portal(ENABLE_AUTH="false")
    apps = await apps_by_name(client, open_p.url(open_p.portal_port, "/api/apps"))
    assert all("token" not in app["url"] for app in apps.values())
    assert apps["vLLM API"]["url"] == f"http://127.0.0.1:{open_p.api_port}/docs"
    apps = await apps_by_name(client, p.url(p.portal_port, "/api/apps"), headers=BEARER)
    assert "token=" in apps["vLLM API"]["url"]


async def test_metrics_has_machine_and_engine_figures(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    history: list[dict] = []
    for _ in range(50):
        async with client.get(p.url(p.portal_port, "/api/metrics"), headers=BEARER) as response:
            history = (await response.json())["history"]
        if history:
            break
        await asyncio.sleep(0.1)
    point = history[-1]
    assert 0 <= point["cpu_percent"] <= 100 and 0 < point["ram_percent"] <= 100
    assert point["requests_running"] == 3 and point["requests_waiting"] == 1
    assert point["kv_cache_usage"] == 0.25 and point["prefix_hit_rate"] == 0.25


async def test_links_keep_the_apps_own_query_and_mend_a_missing_slash(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    portal, ui, lab, docs = free_ports(4)
    config = "|".join(
        [
            f"localhost:{portal}:{ui}:/:Instance Portal",
            f"localhost:{lab}:18888:/lab?reset:Jupyter",
            f"localhost:{docs}:18001:docs:vLLM API",
        ]
    )
    await start_portal(PORTAL_CONFIG=config)
    apps = await apps_by_name(client, f"http://127.0.0.1:{portal}/api/apps", headers=BEARER)
    assert apps["Jupyter"]["url"] == f"http://127.0.0.1:{lab}/lab?reset&token={TOKEN}"
    assert apps["vLLM API"]["url"] == f"http://127.0.0.1:{docs}/docs?token={TOKEN}"


async def test_api_app_shows_the_model_of_an_engine_that_requires_a_key(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer engine-key-9999":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "keyed-model"}]})

    engine = web.Application()
    engine.router.add_get("/health", lambda request: web.Response(text="ok"))
    engine.router.add_get("/v1/models", models)
    runner = web.AppRunner(engine)
    await runner.setup()
    portal, ui, api, engine_port = free_ports(4)
    await web.TCPSite(runner, "127.0.0.1", engine_port).start()
    try:
        config = f"localhost:{portal}:{ui}:/:Instance Portal|127.0.0.1:{api}:{engine_port}:/docs:vllm api"
        await start_portal(PORTAL_CONFIG=config, VLLM_ARGS="--port 1 --api-key engine-key-9999")
        apps = await apps_by_name(client, f"http://127.0.0.1:{portal}/api/apps", headers=BEARER)
        # Found by name case-insensitively, as the vllm program finds it; asked with the engine's key.
        assert apps["vllm api"]["engine"] == {"model": "keyed-model", "health": "healthy"}
    finally:
        await runner.cleanup()


async def test_api_errors_are_json(start_portal: StartPortal, client: aiohttp.ClientSession) -> None:
    p = await start_portal()
    async with client.get(p.url(p.portal_port, "/api/nope"), headers=BEARER) as response:
        assert response.status == 404 and (await response.json()) == {"error": "Not Found"}
    async with client.delete(p.url(p.portal_port, "/api/apps"), headers=BEARER) as response:
        assert response.status == 405 and "GET" in response.headers["Allow"]
        assert (await response.json()) == {"error": "Method Not Allowed"}
