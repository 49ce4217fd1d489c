"""The dashboard's JSON API: services, logs, tunnels, metrics (all behind the UI's auth middleware)."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tokenmill_appliance.portal import logs
from tokenmill_appliance.portal.services import (
    ACTIONS,
    ProtectedProgramError,
    SupervisorError,
    UnknownProgramError,
)
from tokenmill_appliance.portal.state import STATE
from tokenmill_appliance.portal.tunnels import QuickTunnelsOffError, TunnelError, TunnelNotFoundError


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def list_services(request: web.Request) -> web.Response:
    try:
        programs = await request.app[STATE].supervisor.programs()
    except SupervisorError as exc:
        return error(503, str(exc))
    return web.json_response({"programs": programs})


async def control_service(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in ACTIONS:
        return error(404, f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    try:
        program = await request.app[STATE].supervisor.control(name, action)
    except ProtectedProgramError as exc:
        return error(403, str(exc))
    except UnknownProgramError as exc:
        return error(404, str(exc))
    except SupervisorError as exc:
        return error(503, str(exc))
    return web.json_response({"program": program})


async def list_logs(request: web.Request) -> web.Response:
    log_dir = request.app[STATE].settings.log_dir
    return web.json_response({"files": await asyncio.to_thread(logs.list_logs, log_dir)})


async def stream_log(request: web.Request) -> web.StreamResponse:
    """WebSocket: the last 750 lines of `?file=NAME.log`, then every append."""
    log_dir = request.app[STATE].settings.log_dir
    if not is_same_origin(request):
        return error(403, "the log stream only answers pages of this portal")
    try:
        path = logs.resolve_log_file(log_dir, request.query.get("file", ""))
        log = logs.open_log(path)
    except logs.LogPathError as exc:
        return error(400, str(exc))
    except FileNotFoundError:
        return error(404, f"no log {request.query['file']!r}")
    with log:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        try:
            await logs.follow(ws, path.name, log)
        finally:
            await ws.close()
    return ws


def is_same_origin(request: web.Request) -> bool:
    """Browsers send Origin on WebSocket handshakes; one from another site must not read the logs."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


async def read_log(request: web.Request) -> web.Response:
    """The last 750 lines of one log as text (the same tail the live stream starts with)."""
    log_dir = request.app[STATE].settings.log_dir
    try:
        path = logs.resolve_log_file(log_dir, request.match_info["name"])
        data, _ = await asyncio.to_thread(logs.tail_bytes, path)
    except logs.LogPathError as exc:
        return error(400, str(exc))
    except FileNotFoundError:
        return error(404, f"no log {request.match_info['name']!r}")
    return web.Response(text=data.decode("utf-8", "replace"), content_type="text/plain")


async def download_logs(request: web.Request) -> web.Response:
    log_dir = request.app[STATE].settings.log_dir
    data = await asyncio.to_thread(logs.zip_logs, log_dir)
    name = f"logs-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


def _tunnel_targets(request: web.Request) -> list[dict[str, Any]]:
    state = request.app[STATE]
    scheme = "https" if state.is_tls else "http"
    return [
        {"name": app.name, "target": f"{scheme}://localhost:{app.external_port}"}
        for app in state.apps
        if app.is_proxied
    ]


async def list_tunnels(request: web.Request) -> web.Response:
    status = request.app[STATE].tunnels.status()
    return web.json_response({**status, "targets": _tunnel_targets(request)})


async def start_tunnel(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        target = str(body["target"])
    except (ValueError, KeyError, TypeError):
        return error(400, 'send {"target": "https://localhost:PORT"}')
    try:
        tunnel = await request.app[STATE].tunnels.start(target)
    except TunnelError as exc:
        return tunnel_error(exc)
    return web.json_response({"tunnel": tunnel})


def tunnel_error(exc: TunnelError) -> web.Response:
    if isinstance(exc, TunnelNotFoundError):
        return error(404, str(exc))
    return error(409 if isinstance(exc, QuickTunnelsOffError) else 400, str(exc))


async def tunnel_action(request: web.Request) -> web.Response:
    tunnels = request.app[STATE].tunnels
    tunnel_id, action = request.match_info["id"], request.match_info["action"]
    try:
        if action == "stop":
            await tunnels.stop(tunnel_id)
            return web.json_response({"stopped": tunnel_id})
        if action == "refresh":
            return web.json_response({"tunnel": await tunnels.refresh(tunnel_id)})
        if action == "start" and tunnel_id == "named":  # started again after a stop
            return web.json_response({"tunnel": await tunnels.start_named()})
    except TunnelError as exc:
        return tunnel_error(exc)
    return error(404, f"unknown action {action!r}; expected stop or refresh (or start, for 'named')")


async def metrics(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].metrics.snapshot())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/services", list_services)
    app.router.add_post("/api/services/{name}/{action}", control_service)
    app.router.add_get("/api/logs", list_logs)
    app.router.add_get("/api/logs/stream", stream_log)
    app.router.add_get("/api/logs/download", download_logs)
    app.router.add_get("/api/logs/{name}", read_log)
    app.router.add_get("/api/tunnels", list_tunnels)
    app.router.add_post("/api/tunnels", start_tunnel)
    app.router.add_post("/api/tunnels/{id}/{action}", tunnel_action)
    app.router.add_get("/api/metrics", metrics)
