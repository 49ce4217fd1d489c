"""The edge end to end: real Portal, real upstream, real HTTP(S) on 127.0.0.1 (spec section 3)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import aiohttp
import pytest
from yarl import URL

from .conftest import PASSWORD, SSE_EVENTS, SSE_INTERVAL_S, TOKEN, StartPortal

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def get(client: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, dict, str]:
    async with client.get(url, allow_redirects=False, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), await response.text()


async def test_auth_paths_accepted_and_refused(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    url = p.url(p.api_port, "/v1/echo")
    basic_ok = "Basic " + base64.b64encode(f"vastai:{PASSWORD}".encode()).decode()
    basic_bad = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    accepted = [
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"Bearer {PASSWORD}"},
        {"Cookie": f"portal_auth_token={TOKEN}"},
        {"Authorization": basic_ok},
    ]
    refused = [
        {},
        {"Authorization": f"Bearer {TOKEN}-wrong"},
        {"Cookie": f"portal_auth_token={TOKEN}x"},
        {"Cookie": f"xportal_auth_token={TOKEN}"},
        {"Cookie": f"other=portal_auth_token={TOKEN}"},
        {"Authorization": basic_bad},
    ]
    for headers in accepted:
        status, _, body = await get(client, url, headers=headers)
        assert status == 200, headers
        assert json.loads(body)["path"] == "/v1/echo"
    for headers in refused:
        status, response_headers, _ = await get(client, url, headers=headers)
        assert status == 401, headers
        assert response_headers["WWW-Authenticate"] == 'Basic realm="restricted"'


async def test_basic_auth_success_sets_cookie(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    basic_ok = "Basic " + base64.b64encode(f"vastai:{PASSWORD}".encode()).decode()
    status, headers, _ = await get(client, p.url(p.api_port), headers={"Authorization": basic_ok})
    assert status == 200
    assert headers["Set-Cookie"].startswith(f"portal_auth_token={TOKEN};")


async def test_query_token_redirects_a_browser(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    url = p.url(p.api_port, f"/docs?x=1&token={TOKEN}")
    status, headers, _ = await get(client, url, headers={"Accept": "text/html,application/xhtml+xml"})
    assert status == 302
    assert headers["Location"] == "/docs?x=1"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"portal_auth_token={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=604800" in cookie
    assert "Secure" not in cookie
    status, _, body = await get(
        client, p.url(p.api_port, "/docs?x=1"), headers={"Cookie": cookie.split(";")[0]}
    )
    assert status == 200 and json.loads(body)["query"] == {"x": "1"}


async def test_query_token_passes_an_api_client_through(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    status, headers, body = await get(client, p.url(p.api_port, f"/v1/models/x?a=1&token={TOKEN}&b=2"))
    assert status == 200
    echoed = json.loads(body)
    assert echoed["query"] == {"a": "1", "b": "2"}
    assert "Set-Cookie" in headers
    status, _, _ = await get(client, p.url(p.api_port, "/v1/x?token=wrong"), headers={"Accept": "text/html"})
    assert status == 401


@pytest.mark.parametrize(
    "path",
    [
        "/manifest.json",
        "/site.webmanifest",
        "/.well-known/security.txt",
        "/.well-known/acme-challenge/abc123",
    ],
)
async def test_open_paths_reach_the_app_without_auth(
    start_portal: StartPortal, client: aiohttp.ClientSession, path: str
) -> None:
    p = await start_portal()
    status, _, body = await get(client, p.url(p.api_port, path))
    assert status == 200 and json.loads(body)["path"] == path


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/acme-challenge/../../v1/echo",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/v1/echo",
        "/.well-known/acme-challenge/..%2f..%2fv1/echo",
    ],
)
async def test_dot_segments_never_open_a_path(
    start_portal: StartPortal, client: aiohttp.ClientSession, path: str
) -> None:
    p = await start_portal()
    for port in (p.api_port, p.portal_port):  # an app, and the dashboard (whose API trusts the edge)
        url = URL(p.url(port, path), encoded=True)  # sent as written, not normalized by the client
        async with client.get(url, allow_redirects=False) as response:
            assert response.status == 401, (port, path)
    # An open path reaches the app exactly as written, so what was checked is what is served.
    status, _, body = await get(
        client, URL(p.url(p.api_port, "/.well-known/acme-challenge/a%2Fb"), encoded=True)
    )
    assert status == 200 and json.loads(body)["raw_path"] == "/.well-known/acme-challenge/a%2Fb"


async def test_portal_resolver_is_answered_by_the_edge(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    status, headers, body = await get(client, p.url(p.dead_port, "/portal-resolver"))
    assert (status, body) == (200, "")
    assert headers["Access-Control-Allow-Origin"] == "*"


async def test_auth_exclude_port_and_enable_auth_false(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    assert (await get(client, p.url(p.open_port, "/x")))[0] == 200
    assert (await get(client, p.url(p.api_port, "/x")))[0] == 401
    off = await start_portal(ENABLE_AUTH="false")
    assert (await get(client, off.url(off.api_port, "/x")))[0] == 200


async def test_placeholder_on_a_dead_upstream(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    status, headers, body = await get(client, p.url(p.dead_port, "/lab"), headers=BEARER)
    assert status == 502
    assert headers["X-Portal-Placeholder"] == "true"
    assert headers["Cache-Control"] == "no-store"
    assert "Starting up" in body and "location.reload" in body


async def test_placeholder_while_the_backend_is_not_ready(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    page = {**BEARER, "Accept": "text/html,application/xhtml+xml"}
    for headers in (page, BEARER):  # a person and an API client alike
        status, answer, body = await get(client, p.url(p.api_port, "/loading"), headers=headers)
        assert status == 502 and answer["X-Portal-Placeholder"] == "true" and "Starting up" in body
        assert answer["Cache-Control"] == "no-store"
    # A ready backend's full queue is its own answer to give, with its retry hint and error body.
    status, headers, body = await get(client, p.url(p.api_port, "/queue-full"), headers=BEARER)
    assert status == 503 and headers["Retry-After"] == "5"
    assert json.loads(body)["error"]["code"] == "server_overloaded"
    assert "X-Portal-Placeholder" not in headers


async def test_forwarded_headers_and_private_headers(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    headers = {
        "Cookie": f"a=1; portal_auth_token={TOKEN}; b=2",
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6;host=evil.example",
        "X-Tokenmill-Edge": "forged authenticated",
        "Keep-Alive": "timeout=5",
    }
    status, _, body = await get(client, p.url(p.api_port, "/h"), headers=headers)
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Real-IP"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{p.api_port}"
    assert seen["Cookie"] == "a=1; b=2"
    assert "X-Tokenmill-Edge" not in seen and "Keep-Alive" not in seen and "Forwarded" not in seen


async def test_request_body_reaches_the_app(start_portal: StartPortal, client: aiohttp.ClientSession) -> None:
    p = await start_portal()
    payload = "x" * 300_000
    async with client.post(p.url(p.api_port, "/v1/completions"), data=payload, headers=BEARER) as response:
        echoed = await response.json()
    assert echoed["method"] == "POST" and echoed["body"] == payload
    url = p.url(p.api_port, "/v1/x")
    async with client.post(url, data=b"continued", headers=BEARER, expect100=True) as response:
        assert (await response.json())["body"] == "continued"


async def test_https_served_and_http_redirected_on_the_same_port(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal(ENABLE_HTTPS="true")
    assert p.settings.cert_file.exists() and p.settings.key_file.exists()
    status, headers, body = await get(client, f"https://127.0.0.1:{p.api_port}/v1/x?q=1", headers=BEARER)
    assert status == 200
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"
    status, headers, _ = await get(
        client, f"https://127.0.0.1:{p.api_port}/?token={TOKEN}", headers={"Accept": "text/html"}
    )
    assert status == 302 and "Secure" in headers["Set-Cookie"]
    status, headers, _ = await get(client, f"http://127.0.0.1:{p.api_port}/v1/x?q=1")
    assert status == 308
    assert headers["Location"] == f"https://127.0.0.1:{p.api_port}/v1/x?q=1"
    # The client's Host header: a bare name keeps this port; anything else is refused.
    status, headers, _ = await get(
        client, f"http://127.0.0.1:{p.api_port}/a", headers={"Host": "name.example:1"}
    )
    assert status == 308 and headers["Location"] == f"https://name.example:{p.api_port}/a"
    status, _, _ = await get(client, f"http://127.0.0.1:{p.api_port}/a", headers={"Host": "evil.example/x?"})
    assert status == 400
    # A browser's ?token= redirect never leaves for another site (`//host` in Location would).
    status, headers, _ = await get(
        client,
        URL(f"https://127.0.0.1:{p.api_port}//evil.example/x?token={TOKEN}", encoded=True),
        headers={"Accept": "text/html"},
    )
    assert status == 302 and not headers["Location"].startswith(("//", "/\\"))
    async with client.ws_connect(f"wss://127.0.0.1:{p.api_port}/ws", headers=BEARER) as ws:
        await ws.send_str("over tls")
        assert (await ws.receive(timeout=5)).data == "echo: over tls"


async def test_sse_events_arrive_as_they_are_produced(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    arrivals: list[float] = []
    async with client.get(p.url(p.api_port, "/sse"), headers=BEARER) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == SSE_EVENTS
    # The upstream spaces events SSE_INTERVAL_S apart. Buffered delivery would put them all within a few
    # milliseconds of each other; compare relative spacing with wide margins for a noisy machine.
    span = arrivals[-1] - arrivals[0]
    expected = (SSE_EVENTS - 1) * SSE_INTERVAL_S
    assert span > 0.5 * expected
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert sum(gap > 0.25 * SSE_INTERVAL_S for gap in gaps) >= len(gaps) // 2


async def test_websocket_echo_through_the_edge(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    url = p.url(p.api_port, "/ws").replace("http", "ws", 1)
    async with client.ws_connect(url, headers=BEARER, protocols=("echo.v1",)) as ws:
        assert ws.protocol == "echo.v1"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo: hello"
        await ws.send_bytes(b"abc")
        assert (await ws.receive(timeout=5)).data == b"cba"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(url):
            pass
    assert refused.value.status == 401
    # A right ?token= on the upgrade is let in, and the 101 carries the auth cookie as any answer would.
    async with client.ws_connect(f"{url}?token={TOKEN}") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo: hi"
        assert ws._response.headers["Set-Cookie"].startswith(f"portal_auth_token={TOKEN};")


async def test_tokens_never_logged(
    start_portal: StartPortal, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = await start_portal()
    await get(client, p.url(p.api_port, f"/?token={TOKEN}"))
    await get(client, p.url(p.api_port, "/"), headers={"Cookie": f"portal_auth_token={TOKEN}"})
    await get(client, p.url(p.dead_port, f"/?token={TOKEN}"))
    await get(client, p.url(p.dead_port, f"/manifest.json?token={TOKEN}"))
    await get(client, p.url(p.open_port, f"/?token={TOKEN}"))
    await asyncio.sleep(0.1)
    assert caplog.records
    assert TOKEN not in caplog.text and PASSWORD not in caplog.text


async def raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return answer


async def test_malformed_requests_never_log_their_tokens(
    start_portal: StartPortal, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's own error log quotes the line it could not parse: a token in it must not reach the log.
    caplog.set_level(logging.DEBUG)
    p = await start_portal()
    malformed = [
        f"GET /x?token={TOKEN}&q=a b HTTP/1.1\r\nHost: a\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: a\r\nCookie: portal_auth_token={PASSWORD}\x00\r\n\r\n",
    ]
    for port in (p.api_port, p.ui_port):
        for request in malformed:
            status_line = (await raw_exchange(port, request.encode())).split(b"\r\n", 1)[0]
            assert status_line.endswith(b" 400 Bad Request")
    await asyncio.sleep(0.1)
    assert "malformed request refused" in caplog.text
    assert TOKEN not in caplog.text and PASSWORD not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_portal_credential_stops_at_the_edge(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    # Jupyter, Ray and user apps have no use for the portal's token or login; only an engine whose own
    # API key is that token gets it, and an Authorization that is not the portal's passes as sent.
    basic = "Basic " + base64.b64encode(f"vastai:{PASSWORD}".encode()).decode()
    cookie = {"Cookie": f"portal_auth_token={TOKEN}"}
    p = await start_portal()
    for headers in (BEARER, {"Authorization": basic}):
        status, _, body = await get(client, p.url(p.api_port, "/h"), headers=headers)
        assert status == 200 and "Authorization" not in json.loads(body)["headers"]
    status, _, body = await get(
        client, p.url(p.api_port, "/h"), headers={**cookie, "Authorization": "Bearer k"}
    )
    assert status == 200 and json.loads(body)["headers"]["Authorization"] == "Bearer k"
    status, _, body = await get(client, p.url(p.open_port, "/h"), headers=BEARER)
    assert json.loads(body)["headers"]["Authorization"] == BEARER["Authorization"]  # no auth on that port

    # The token is one of the engine's keys (VLLM_ARGS may give several, as vLLM's --api-key takes).
    for keys in (TOKEN, f"sk-other {TOKEN}"):
        keyed = await start_portal(VLLM_ARGS=f"--port 18000 --api-key {keys}")
        status, _, body = await get(client, keyed.url(keyed.api_port, "/h"), headers=BEARER)
        assert status == 200 and json.loads(body)["headers"]["Authorization"] == BEARER["Authorization"]
        status, _, _ = await get(client, keyed.url(keyed.api_port, "/h"))
        assert status == 401


async def test_a_path_with_an_encoded_newline_is_proxied(
    start_portal: StartPortal, client: aiohttp.ClientSession
) -> None:
    p = await start_portal()
    url = URL(p.url(p.api_port, "/a%0Ab"), encoded=True)
    async with client.get(url, headers=BEARER) as response:
        assert response.status == 200 and (await response.json())["raw_path"] == "/a%0Ab"
