"""Live-server fixtures for the portal tests: a real upstream app and a real Portal, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tokenmill_appliance.portal.server import Portal
from tokenmill_appliance.portal.services import ProgramControl, SupervisorError
from tokenmill_appliance.portal_apps import load_apps
from tokenmill_appliance.settings import Settings

TOKEN = "test-open-button-token-1234"
PASSWORD = "test-web-password-5678"
SSE_EVENTS = 6
SSE_INTERVAL_S = 0.4


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are picked, so none repeats (one
    socket at a time, the OS may hand the same port out twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.rel_url.raw_path,
            "raw_query": request.rel_url.raw_query_string,
            "query": dict(request.query),
            "headers": dict(request.headers),
            "body": body.decode(),
        }
    )


async def sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(SSE_EVENTS):
        await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
        await asyncio.sleep(SSE_INTERVAL_S)
    await response.write(b"data: [DONE]\n\n")
    return response


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("echo.v1",))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(f"echo: {msg.data}")
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "SmolLM2-135M-Instruct"}]})


async def prometheus(request: web.Request) -> web.Response:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{model_name="m"} 1.0\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
        'vllm:generation_tokens_total{model_name="m"} 100.0\n'
        'vllm:generation_tokens_created{model_name="m"} 1.7e9\n'
        'vllm:prefix_cache_hits_total{model_name="m"} 30.0\n'
        'vllm:prefix_cache_queries_total{model_name="m"} 120.0\n'
    )
    return web.Response(text=text)


def unavailable(message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}
    return web.json_response(body, status=503, headers={"Retry-After": "5"})


async def loading(request: web.Request) -> web.Response:
    """What `tokenmill serve` answers while its model loads."""
    return unavailable("the model is still loading", "engine_unavailable")


async def queue_full(request: web.Request) -> web.Response:
    """What `tokenmill serve` answers, ready, when its queue is full."""
    return unavailable("the server is at its limit of waiting requests", "server_overloaded")


def upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/loading", loading)
    app.router.add_get("/queue-full", queue_full)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", prometheus)
    app.router.add_route("*", r"/{tail:[\s\S]*}", echo)
    return app


@dataclass
class Upstream:
    port: int


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    # No access log: the stand-in app behind an excluded port sees tokens that the portal passes on.
    runner = web.AppRunner(upstream_app(), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Upstream(port)
    await runner.cleanup()


@dataclass
class RunningPortal:
    portal: Portal
    settings: Settings
    ui_port: int
    api_port: int
    """The edge port proxying to the upstream (the "vLLM API" app)."""
    dead_port: int
    """An edge port whose backend is not listening."""
    open_port: int
    """An edge port listed in AUTH_EXCLUDE."""
    portal_port: int
    """The edge port of the dashboard itself."""

    @property
    def scheme(self) -> str:
        return "https" if self.portal.ssl_context else "http"

    def url(self, port: int, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{port}{path}"


StartPortal = Callable[..., Awaitable[RunningPortal]]


@pytest_asyncio.fixture
async def start_portal(tmp_path: Path, upstream: Upstream) -> AsyncIterator[StartPortal]:
    started: list[Portal] = []

    async def start(cloudflared: str | None = None, **env: str) -> RunningPortal:
        names = ("portal", "ui", "api", "dead", "dead_int", "open")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        config = "|".join(
            [
                f"localhost:{ports['portal']}:{ports['ui']}:/:Instance Portal",
                f"127.0.0.1:{ports['api']}:{upstream.port}:/docs:vLLM API",
                f"127.0.0.1:{ports['dead']}:{ports['dead_int']}:/:Jupyter",
                f"127.0.0.1:{ports['open']}:{upstream.port}:/:Open App",
            ]
        )
        base = {
            "TOKENMILL_ROOT": str(tmp_path / f"root{len(started)}"),
            "PORTAL_CONFIG": config,
            "OPEN_BUTTON_TOKEN": TOKEN,
            "WEB_PASSWORD": PASSWORD,
            "ENABLE_HTTPS": "false",
            "AUTH_EXCLUDE": str(ports["open"]),
        }
        settings = Settings.from_env({**base, **env})
        portal = Portal(settings, load_apps(settings), bind_host="127.0.0.1", cloudflared=cloudflared or "")
        await portal.start()
        started.append(portal)
        return RunningPortal(
            portal, settings, ports["ui"], ports["api"], ports["dead"], ports["open"], ports["portal"]
        )

    yield start
    for portal in started:
        await portal.stop()


def client_ssl() -> ssl.SSLContext:
    """The tests trust whatever certificate the portal made (it is self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_ssl())
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


SUPERVISORD_CONF = """\
[unix_http_server]
file={socket}

[supervisord]
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:sleeper]
command=sleep 600
startsecs=0
stopwaitsecs=3

[program:portal]
command=sleep 600
startsecs=0
stopwaitsecs=3

# Exits 0 at once, as a wrapper whose app is not configured does.
[program:skipper]
command=true
startsecs=0
autorestart=false
"""


def _all_running(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        infos = ProgramControl(socket_path)._call("getAllProcessInfo")
    except SupervisorError:
        return False
    return all(info["statename"] == ("EXITED" if info["name"] == "skipper" else "RUNNING") for info in infos)


@pytest.fixture
def supervisord(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Starts a real supervisord whose XML-RPC socket is at the given path (two `sleep` programs and one
    that exits at once)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(socket_path: Path) -> None:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        conf = tmp_path / "supervisord.conf"
        conf.write_text(SUPERVISORD_CONF.format(socket=socket_path, dir=tmp_path))
        process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + 15
        while not _all_running(socket_path):
            assert process.poll() is None, "supervisord exited"
            assert time.monotonic() < deadline, "supervisord did not start its programs"
            time.sleep(0.05)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=15)
