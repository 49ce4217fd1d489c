"""Streaming reverse proxy: HTTP/1.1 without buffering, WebSocket passthrough, the "starting up" page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",  # the edge has already answered any 100-continue itself
    )
)
# aiohttp writes these itself when it opens a WebSocket.
WS_HANDSHAKE = frozenset(
    h.lower()
    for h in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
    )
)
FORWARDED = frozenset(
    h.lower() for h in ("Forwarded", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
)
"""Set by the edge alone (the X- ones) or not at all (RFC 7239's): a client's own would be believed."""
BUSY_CODES = frozenset({"server_overloaded"})
"""Error codes of a 503 from a backend that is ready but full (tokenmill's queue limit)."""

PLACEHOLDER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Starting up</title>
<style>body{font-family:system-ui,sans-serif;background:#111;color:#ddd;display:flex;
align-items:center;justify-content:center;height:100vh;margin:0}div{text-align:center}</style></head>
<body><div><h1>Starting up&hellip;</h1><p>This service is not ready yet; this page retries by itself.</p>
</div>
<script>setTimeout(function(){location.reload()},3000)</script></body></html>
"""


def exact(url: str) -> URL:
    """`url` as given, its path not normalized: the backend gets the path the edge authorized."""
    return URL(url, encoded=True)


def without_query(url: str) -> str:
    """A URL fit for logs: queries can hold a token (open paths and excluded ports pass them on)."""
    return url.split("?", 1)[0]


def placeholder(reason: str = "") -> web.Response:
    """The 502 page shown while a backend is down or not ready; it reloads itself."""
    if reason:
        logger.debug("backend unavailable: %s", reason)
    return web.Response(
        status=502,
        text=PLACEHOLDER_HTML,
        content_type="text/html",
        headers={"X-Portal-Placeholder": "true", "Cache-Control": "no-store"},
    )


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    listed = ",".join(headers.getall("Connection", []))
    return {t.strip().lower() for t in listed.split(",") if t.strip()}


def upstream_headers(
    request: web.Request, drop: Iterable[str] = (), extra: dict[str, str] | None = None
) -> CIMultiDict[str]:
    """The request's headers for the backend: hop-by-hop and our own dropped, forwarding headers set."""
    skip = HOP_BY_HOP | FORWARDED | _connection_tokens(request.headers) | {d.lower() for d in drop}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        if name.lower() not in skip:
            headers.add(name, value)
    client_ip = request.remote or ""
    headers["X-Forwarded-For"] = client_ip
    headers["X-Real-IP"] = client_ip
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers.update(extra or {})
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    skip = HOP_BY_HOP | _connection_tokens(upstream)
    return CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in skip)


def new_client_session() -> aiohttp.ClientSession:
    """The proxy's client: no overall timeout (streams are long), no decompression, no added headers."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in _connection_tokens(
        request.headers
    )


async def proxy_http(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    headers: CIMultiDict[str],
    on_response: list[tuple[str, str]] | None = None,
    starting_503: bool = True,
) -> web.StreamResponse:
    """Forward one request to `url` and stream the answer back as it arrives. With `starting_503` a 503
    other than a full queue's means the backend is not ready yet: the placeholder answers instead."""
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, exact(url), headers=headers, data=body, allow_redirects=False, compress=None
        )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return placeholder(f"{without_query(url)}: {exc}")
    busy_body = b""
    if upstream.status == 503 and starting_503:
        # Up but not ready (the model server answers 503 while it loads, or once its engine died): the
        # page that retries by itself, for every client, as for a backend that is down. Only a full
        # queue's 503 is the backend's to give: it is ready, and its Retry-After says when to come back.
        busy_body = await busy_answer(upstream)
        if not busy_body:
            upstream.release()
            return placeholder(f"{without_query(url)}: 503 {upstream.reason}")
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(response_headers(upstream.headers))
    for name, value in on_response or []:
        response.headers.add(name, value)
    try:
        await response.prepare(request)
        if busy_body:
            await response.write(busy_body)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        upstream.release()
    except (aiohttp.ClientError, ConnectionResetError) as exc:
        logger.debug("stream to %s ended early: %s", without_query(url), exc)
    finally:
        upstream.close()
    return response


async def _pump_to_upstream(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    async for msg in client:
        if msg.type == WSMsgType.TEXT:
            await upstream.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await upstream.send_bytes(msg.data)
    await upstream.close()


async def _pump_to_client(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    async for msg in upstream:
        if msg.type == WSMsgType.TEXT:
            await client.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await client.send_bytes(msg.data)
    await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)


async def busy_answer(upstream: aiohttp.ClientResponse) -> bytes:
    """The body of a 503 that says the backend's queue is full (an OpenAI-style error whose code is in
    BUSY_CODES), else b"". Only a small JSON body with a declared length is read."""
    length = upstream.content_length
    if upstream.content_type != "application/json" or length is None or length > 65536:
        return b""
    body = await upstream.read()
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return b""
    return body if isinstance(error, dict) and error.get("code") in BUSY_CODES else b""


async def proxy_websocket(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    headers: CIMultiDict[str],
    on_response: list[tuple[str, str]] | None = None,
) -> web.StreamResponse:
    """Open the backend WebSocket first (502 page if it refuses), then relay frames both ways."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for name in list(headers):
        if name.lower() in WS_HANDSHAKE:
            del headers[name]
    try:
        upstream = await session.ws_connect(
            exact(url), headers=headers, protocols=protocols, max_msg_size=0, autoping=True, compress=0
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The backend answered but refused the upgrade: pass its refusal on (a non-error answer is a 502).
        status = exc.status if exc.status >= 400 else 502
        return web.Response(
            status=status, text=f"WebSocket refused by the backend: {exc.status} {exc.message}\n"
        )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return placeholder(f"{without_query(url)}: {exc}")
    client = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (), max_msg_size=0, autoping=True
    )
    for name, value in on_response or []:
        client.headers.add(name, value)  # sent with the 101 that accepts the upgrade
    try:
        await client.prepare(request)
        tasks = [
            asyncio.create_task(_pump_to_upstream(client, upstream)),
            asyncio.create_task(_pump_to_client(client, upstream)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, ConnectionResetError):
                await task
    finally:
        await upstream.close()
        await client.close()
    return client
