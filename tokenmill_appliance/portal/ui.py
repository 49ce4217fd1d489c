"""The dashboard: one static page and its JSON API, served on the portal's internal port (127.0.0.1).

Requests normally arrive through the edge, which vouches for the viewer with a per-process secret header;
a request made straight to the internal port goes through the same auth rules itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from yarl import URL

from tokenmill_appliance.portal import api
from tokenmill_appliance.portal.auth import Verdict
from tokenmill_appliance.portal.edge import EDGE_HEADER
from tokenmill_appliance.portal.state import IS_AUTHENTICATED, STATE, PortalState
from tokenmill_appliance.portal_apps import API_APP_NAME, PortalApp, find_app
from tokenmill_appliance.programs.commands import engine_api_key

STATIC_DIR = Path(__file__).parent / "static"
CSRF_HEADER = "X-Portal-Request"
PROBE_TIMEOUT_S = 1.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if request.path == "/health":
        return await handler(request)
    viewer = state.edge_secret.viewer(request.headers.get(EDGE_HEADER, ""))
    if viewer is None:
        result = state.auth.check(request, state.portal_port)
        if result.verdict is Verdict.DENY:
            return state.auth.unauthorized()
        if result.verdict is Verdict.REDIRECT:
            return state.auth.redirect(result, request.secure)
        viewer = "authenticated" if result.is_authenticated else "open"
    request[IS_AUTHENTICATED] = viewer == "authenticated"
    # With auth off too: a page on any site could otherwise drive the dashboard (open a tunnel to it).
    if not is_same_site_call(request, state):
        return web.json_response(
            {"error": "a state-changing call from another site was refused (send it from the dashboard, "
                      "with a Bearer token, or with the X-Portal-Request: 1 header)"},
            status=403,
        )  # fmt: skip
    return await handler(request)


def is_same_site_call(request: web.Request, state: PortalState) -> bool:
    """False for a state-changing call a browser made on behalf of another site.

    Browsers resend the cookie and cached basic-auth credentials on cross-site form posts, and say where
    such a request came from in `Sec-Fetch-Site` (or, in older ones, `Origin`). A request with neither
    header is not a browser's (curl, SDKs), and a custom header or a Bearer token cannot be added to a
    cross-site form post, so those pass too.
    """
    if request.method in ("GET", "HEAD", "OPTIONS") or state.auth.has_bearer(request):
        return True
    if request.headers.get(CSRF_HEADER) == "1":
        return True
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    return api.is_same_origin(request)


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def session_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "authenticated": request[IS_AUTHENTICATED],
            "tls": state.is_tls,
            "auth_enabled": state.settings.enable_auth,
        }
    )


def _viewer_host(request: web.Request) -> str:
    try:
        return URL(f"http://{request.host}").host or "localhost"
    except ValueError:
        return "localhost"


def app_link(request: web.Request, state: PortalState, app: PortalApp) -> str:
    """Where the viewer's browser reaches `app`: the viewer's host name, the app's external port."""
    host = _viewer_host(request)
    scheme = "https" if state.is_tls and app.is_proxied else "http"
    # open_path may lack the leading slash ("docs") and may carry its own query ("/lab?reset"), kept as is.
    path, _, query = app.open_path.partition("?")
    url = str(URL.build(scheme=scheme, host=host, port=app.external_port, path="/" + path.lstrip("/")))
    needs_token = app.is_proxied and not state.auth.is_port_open(app.external_port)
    if needs_token and request[IS_AUTHENTICATED] and state.settings.open_button_token:
        query = "&".join(filter(None, [query, urlencode({"token": state.settings.open_button_token})]))
    return f"{url}?{query}" if query else url


async def _is_listening(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT_S)
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _engine_info(state: PortalState, app: PortalApp) -> dict[str, Any]:
    base = f"http://{app.hostname}:{app.internal_port}"
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S * 2)
    info: dict[str, Any] = {"model": None, "health": "down"}
    key = engine_api_key(state.settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with state.session.get(f"{base}/health", timeout=timeout) as response:
            info["health"] = "healthy" if response.status == 200 else f"unhealthy ({response.status})"
        async with state.session.get(f"{base}/v1/models", headers=headers, timeout=timeout) as response:
            if response.status == 200:
                models = (await response.json()).get("data") or []
                info["model"] = models[0].get("id") if models else None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError):
        pass
    return info


async def _app_status(request: web.Request, state: PortalState, app: PortalApp) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": app.name,
        "external_port": app.external_port,
        "internal_port": app.internal_port,
        "open_path": app.open_path,
        "is_proxied": app.is_proxied,
        "url": app_link(request, state, app),
        "status": "up" if await _is_listening(app.hostname, app.internal_port) else "down",
    }
    if app is find_app(state.apps, API_APP_NAME):
        item["engine"] = (
            await _engine_info(state, app) if item["status"] == "up" else {"model": None, "health": "down"}
        )
    return item


async def list_apps(request: web.Request) -> web.Response:
    state = request.app[STATE]
    items = await asyncio.gather(*(_app_status(request, state, app) for app in state.apps))
    return web.json_response({"apps": list(items)})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The JSON API answers unknown paths and methods in its own error shape, not aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": exc.reason}, status=exc.status, headers=allow)


# The dashboard's buttons act on the machine: no other page may frame it (clickjacking; pages on the
# host's other ports are same-site, so the cookie would ride along). Its API's answers hold tokens and
# state: never cached.
FRAMING_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in FRAMING_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")


def build_ui_app(state: PortalState) -> web.Application:
    app = web.Application(middlewares=[auth_middleware, json_errors])
    app.on_response_prepare.append(add_security_headers)
    app[STATE] = state
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/api/session", session_info)
    app.router.add_get("/api/apps", list_apps)
    api.add_routes(app)
    app.router.add_static("/static/", STATIC_DIR)
    return app
