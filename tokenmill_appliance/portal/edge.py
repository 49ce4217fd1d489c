"""The edge: one listener per proxied external port, authenticating and proxying to the app behind it.

On a TLS port the first byte of each connection is peeked before any handshake: a TLS ClientHello
(0x16) gets the TLS server, anything else is plain HTTP and gets a redirect to the same URL over https,
on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import socket
import ssl

import aiohttp
from aiohttp import web

from tokenmill_appliance.portal import proxy
from tokenmill_appliance.portal.auth import (
    Authenticator,
    AuthResult,
    Verdict,
    same_site,
    url_without_token,
    without_cookie,
)
from tokenmill_appliance.portal_apps import PortalApp

logger = logging.getLogger(__name__)

EDGE_HEADER = "X-Tokenmill-Edge"
"""Sent only to the portal UI: `<per-process secret> authenticated|open`, so the UI knows the viewer."""
DASHBOARD_HEALTH = "/health"
"""Open on the dashboard's port (only there: on other ports /health belongs to the app)."""
TLS_HANDSHAKE_RECORD = 0x16
FIRST_BYTE_TIMEOUT = 30.0


class EdgeSecret:
    """A per-process secret shared by the edge and the dashboard: no other caller can pose as the edge."""

    def __init__(self, value: str) -> None:
        self._value = value

    def header(self, is_authenticated: bool) -> str:
        return f"{self._value} {'authenticated' if is_authenticated else 'open'}"

    def viewer(self, header: str) -> str | None:
        """`authenticated`/`open` when the header came from this process's edge, else None."""
        secret, _, state = header.partition(" ")
        if hmac.compare_digest(secret.encode(), self._value.encode()) and state in ("authenticated", "open"):
            return state
        return None


class EdgeHandler:
    """Answers every request on one external port: open resolver, auth, then the proxy."""

    def __init__(
        self,
        app: PortalApp,
        auth: Authenticator,
        session: aiohttp.ClientSession,
        edge_secret: EdgeSecret | None = None,
        backend_keys: list[str] | None = None,
    ) -> None:
        """`edge_secret` is given only for the dashboard's own port; `backend_keys` are the API keys the
        app itself takes (the engine's), of which the portal's token may be one."""
        self.app = app
        self.auth = auth
        self.session = session
        self.edge_secret = edge_secret
        self.backend_keys = [key.encode() for key in backend_keys or []]
        self.base_url = f"http://{app.hostname}:{app.internal_port}"

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/portal-resolver":
            return web.Response(status=200, headers={"Access-Control-Allow-Origin": "*"})
        if self.edge_secret is not None and request.path == DASHBOARD_HEALTH:
            result = AuthResult(Verdict.OPEN)
        else:
            result = self.auth.check(request, self.app.external_port)
        if result.verdict is Verdict.DENY:
            return self.auth.unauthorized()
        if result.verdict is Verdict.REDIRECT:
            return self.auth.redirect(result, request.secure)
        return await self._forward(request, result)

    async def _forward(self, request: web.Request, result: AuthResult) -> web.StreamResponse:
        path_qs = url_without_token(request) if result.strip_token else request.rel_url.raw_path_qs
        extra = {}
        if self.edge_secret is not None:
            extra[EDGE_HEADER] = self.edge_secret.header(result.is_authenticated)
        drop = [EDGE_HEADER, "Cookie"]
        if self._withholds_credential(request, result):
            drop.append("Authorization")
        headers = proxy.upstream_headers(request, drop=drop, extra=extra)
        cookie = without_cookie("; ".join(request.headers.getall("Cookie", [])), self.auth.cookie_name)
        if cookie:
            headers["Cookie"] = cookie
        set_cookie = [("Set-Cookie", self.auth.cookie_header(request.secure))] if result.set_cookie else []
        url = self.base_url + path_qs
        if proxy.is_websocket(request):
            return await proxy.proxy_websocket(request, self.session, url, headers, set_cookie)
        # The dashboard is the portal itself, ready whenever it answers: its 503s (supervisord out of
        # reach) are its API's answers, not a backend starting up.
        starting_503 = self.edge_secret is None
        return await proxy.proxy_http(request, self.session, url, headers, set_cookie, starting_503)

    def _withholds_credential(self, request: web.Request, result: AuthResult) -> bool:
        """Whether the portal's own credential (a Bearer token, the basic-auth login) stops here: the app
        behind gets it only if the app needs it too (an engine whose API key is the token), and the
        dashboard, which is this process, always."""
        if self.edge_secret is not None or not result.is_authenticated:
            return False
        if not self.auth.has_own_credential(request):
            return False
        bearer = request.headers.get("Authorization", "").strip().partition(" ")[2].strip()
        # Every key compared (no early exit), so that timing says nothing about which one matched.
        return not any([hmac.compare_digest(bearer.encode(), key) for key in self.backend_keys])


def build_edge_app(handler: EdgeHandler) -> web.Application:
    app = web.Application(client_max_size=0)
    # [\s\S]: every path, a newline (%0A) in it too, which `.` would not match (a text 404).
    app.router.add_route("*", r"/{tail:[\s\S]*}", handler)
    return app


_HOST_NAME = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


async def _redirect_to_https(request: web.Request) -> web.StreamResponse:
    # The Host header is the client's: only a bare host name goes into Location, with this listener's port.
    host, colon, port = request.host.rpartition(":")
    if not colon or not port.isdigit():  # no port given (or an IPv6 address's colons)
        host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not _HOST_NAME.fullmatch(host) or not sockname:
        raise web.HTTPBadRequest(text="400 Bad Request: a Host header naming this machine is needed\n")
    location = f"https://{host}:{sockname[1]}{same_site(request.rel_url.raw_path_qs)}"
    raise web.HTTPPermanentRedirect(location=location)


def build_redirect_app() -> web.Application:
    """What plain HTTP gets on a TLS port: a redirect to the same URL over https."""
    app = web.Application()
    app.router.add_route("*", r"/{tail:[\s\S]*}", _redirect_to_https)
    return app


async def _peek_first_byte(conn: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), on_readable)
    try:
        await asyncio.wait_for(readable, timeout)
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv(1, socket.MSG_PEEK)


class SniffingListener:
    """A TCP listener that hands each connection to the TLS server or, for plain HTTP, the redirect server."""

    def __init__(
        self, host: str, port: int, tls_server: web.Server, plain_server: web.Server, context: ssl.SSLContext
    ) -> None:
        self.host = host
        self.port = port
        self._tls_server = tls_server
        self._plain_server = plain_server
        self._context = context
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._dispatching: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. out of file descriptors: keep the port alive
                logger.warning("accept on port %d failed: %s", self.port, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._dispatch(conn))
            self._dispatching.add(task)
            task.add_done_callback(self._dispatching.discard)

    async def _dispatch(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            first = await _peek_first_byte(conn, FIRST_BYTE_TIMEOUT)
            if not first:
                conn.close()
            elif first[0] == TLS_HANDSHAKE_RECORD:
                await loop.connect_accepted_socket(
                    self._tls_server, conn, ssl=self._context, ssl_handshake_timeout=FIRST_BYTE_TIMEOUT
                )
            else:
                await loop.connect_accepted_socket(self._plain_server, conn)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            logger.debug("connection on port %d dropped before HTTP: %s", self.port, exc)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise

    async def stop(self) -> None:
        tasks = [t for t in (self._accept_task, *self._dispatching) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
