"""`Portal`: starts and stops the dashboard, one edge per proxied port, the tunnels and the samplers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import ssl

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tokenmill_appliance.portal import logs, proxy, tls
from tokenmill_appliance.portal.auth import Authenticator
from tokenmill_appliance.portal.edge import (
    EdgeHandler,
    EdgeSecret,
    SniffingListener,
    build_edge_app,
    build_redirect_app,
)
from tokenmill_appliance.portal.metrics import MetricsSampler
from tokenmill_appliance.portal.services import ProgramControl
from tokenmill_appliance.portal.state import PortalState
from tokenmill_appliance.portal.tunnels import TunnelManager
from tokenmill_appliance.portal.ui import build_ui_app
from tokenmill_appliance.portal_apps import API_APP_NAME, PORTAL_APP_NAME, PortalApp, find_app
from tokenmill_appliance.programs.commands import engine_api_keys
from tokenmill_appliance.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_UI_PORT = 11111
LOCALHOST = "127.0.0.1"
SHUTDOWN_TIMEOUT_S = 2.0


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending request line or header verbatim, which
    can hold a token (`?token=` in a URL with a raw space, a Bearer header with a control character).
    Such a record keeps the fact and the client, loses the text, and is no longer an error: the client's."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = f"{record.msg} (malformed request refused: %s %s)"
            record.args = (
                *(record.args if isinstance(record.args, tuple) else ()),
                error.code,
                type(error).__name__,
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


REQUEST_LOGGER = logging.getLogger("tokenmill_appliance.portal.requests")
REQUEST_LOGGER.addFilter(MalformedRequestFilter())


def find_portal_app(apps: list[PortalApp]) -> PortalApp:
    """The dashboard's own entry: by name, else the app on 1111, else the default ports."""
    named = find_app(apps, PORTAL_APP_NAME)
    if named is not None:
        return named
    for app in apps:
        if app.external_port == 1111:
            return app
    return PortalApp(PORTAL_APP_NAME, "localhost", 1111, DEFAULT_UI_PORT, "/")


class Portal:
    """The whole portal process. `bind_host` is where the external ports listen (0.0.0.0 in production);
    the dashboard always listens on 127.0.0.1."""

    def __init__(
        self,
        settings: Settings,
        apps: list[PortalApp],
        bind_host: str = "0.0.0.0",
        cloudflared: str | None = None,
    ) -> None:
        self.settings = settings
        self.apps = apps
        self.bind_host = bind_host
        self.cloudflared = cloudflared if cloudflared is not None else shutil.which("cloudflared")
        self.portal_app = find_portal_app(apps)
        self.ssl_context: ssl.SSLContext | None = None
        self.listening_ports: list[int] = []
        self._runners: list[web.AppRunner] = []
        self._listeners: list[SniffingListener] = []
        self._background: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.tunnels: TunnelManager | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if settings.enable_https:
            self.ssl_context = tls.server_context(settings.cert_file, settings.key_file)
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        self._session = proxy.new_client_session()
        auth = Authenticator(settings)
        edge_secret = EdgeSecret(secrets.token_urlsafe(32))
        edge_ports = [app.external_port for app in self.apps if app.is_proxied]
        self.tunnels = TunnelManager(self.cloudflared or None, edge_ports, settings.cf_tunnel_token)
        state = PortalState(
            settings=settings,
            apps=self.apps,
            auth=auth,
            edge_secret=edge_secret,
            session=self._session,
            supervisor=ProgramControl(settings.supervisor_socket, settings.skip_note),
            tunnels=self.tunnels,
            metrics=MetricsSampler(settings.workspace if settings.workspace.exists() else settings.root,
                                   self._engine_metrics_url(), self._session),
            is_tls=self.ssl_context is not None,
            portal_port=self.portal_app.external_port,
        )  # fmt: skip
        await self._serve(build_ui_app(state), LOCALHOST, self.portal_app.internal_port)
        await self._start_edges(auth, edge_secret)
        self._background.append(asyncio.create_task(logs.trim_forever(settings.log_dir)))
        self._background.append(asyncio.create_task(state.metrics.run_forever()))
        if settings.cf_tunnel_token and self.tunnels.is_available:
            await self.tunnels.start_named()

    def _engine_metrics_url(self) -> str | None:
        api = find_app(self.apps, API_APP_NAME)
        return f"http://{api.hostname}:{api.internal_port}/metrics" if api else None

    async def _runner(self, app: web.Application) -> web.AppRunner:
        # Streams (SSE, WebSockets, log follows) never finish by themselves: do not wait long for them.
        runner = web.AppRunner(
            app,
            access_log=None,
            logger=REQUEST_LOGGER,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _serve(self, app: web.Application, host: str, port: int) -> None:
        runner = await self._runner(app)
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        self.listening_ports.append(port)

    async def _start_edges(self, auth: Authenticator, edge_secret: EdgeSecret) -> None:
        assert self._session is not None
        plain: web.AppRunner | None = None
        if self.ssl_context is not None:
            plain = await self._runner(build_redirect_app())
        for app in self.apps:
            if not app.is_proxied:
                continue
            secret = edge_secret if app is self.portal_app else None
            backend_keys = engine_api_keys(self.settings) if app is find_app(self.apps, API_APP_NAME) else []
            edge_app = build_edge_app(EdgeHandler(app, auth, self._session, secret, backend_keys))
            try:
                await self._start_edge(edge_app, app.external_port, plain)
            except OSError as exc:
                logger.error("cannot listen on port %d for %s: %s", app.external_port, app.name, exc)

    async def _start_edge(self, edge_app: web.Application, port: int, plain: web.AppRunner | None) -> None:
        if self.ssl_context is None or plain is None:
            await self._serve(edge_app, self.bind_host, port)
            return
        runner = await self._runner(edge_app)
        assert runner.server is not None and plain.server is not None
        listener = SniffingListener(self.bind_host, port, runner.server, plain.server, self.ssl_context)
        await listener.start()
        self._listeners.append(listener)
        self.listening_ports.append(port)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tunnels is not None:
            await self.tunnels.close()
        for listener in self._listeners:
            await listener.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._background, self._listeners, self._runners = [], [], []
