"""The auth decision of spec section 3, rule by rule, on requests built in memory."""

import base64
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tokenmill_appliance.portal.auth import (
    Authenticator,
    Verdict,
    parse_cookie_header,
    url_without_token,
    without_cookie,
)
from tokenmill_appliance.settings import Settings

TOKEN = "open-button-token-abcd"
PASSWORD = "web-password-wxyz"
PORT = 8000


def authenticator(tmp_path: Path, **env: str) -> Authenticator:
    base = {"TOKENMILL_ROOT": str(tmp_path), "OPEN_BUTTON_TOKEN": TOKEN, "WEB_PASSWORD": PASSWORD}
    return Authenticator(Settings.from_env({**base, **env}))


def request(path: str = "/v1/models", **headers: str) -> web.Request:
    return make_mocked_request("GET", path, headers=headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    return authenticator(tmp_path)


def test_no_credentials_is_denied(auth: Authenticator) -> None:
    assert auth.check(request(), PORT).verdict is Verdict.DENY


@pytest.mark.parametrize(
    "path",
    [
        "/portal-resolver",
        "/.well-known/acme-challenge/abc",
        "/manifest.json",
        "/site.webmanifest",
        "/.well-known/security.txt",
    ],
)
def test_open_paths(auth: Authenticator, path: str) -> None:
    assert auth.check(request(path), PORT).verdict is Verdict.OPEN


@pytest.mark.parametrize(
    "path",
    [
        "/manifest.jsonx",
        "/.well-known/acme-challenge",
        "/x/manifest.json",
        # What a backend would see as /v1/x or /api/apps: dot segments never ride on an open prefix.
        "/.well-known/acme-challenge/../../v1/x",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/api/apps",
        "/.well-known/acme-challenge/..%2f..%2fapi/apps",
        "/.well-known/acme-challenge/./x",
    ],
)
def test_near_open_paths_are_not_open(auth: Authenticator, path: str) -> None:
    assert auth.check(request(path), PORT).verdict is Verdict.DENY


@pytest.mark.parametrize("token", [TOKEN, PASSWORD])
def test_query_token_browser_redirects_without_token(auth: Authenticator, token: str) -> None:
    result = auth.check(request(f"/lab?a=1&token={token}&b=2", Accept="text/html,*/*"), PORT)
    assert result.verdict is Verdict.REDIRECT
    assert result.set_cookie
    assert result.location == "/lab?a=1&b=2"


def test_query_token_document_fetch_redirects(auth: Authenticator) -> None:
    result = auth.check(request(f"/?token={TOKEN}", **{"Sec-Fetch-Dest": "document"}), PORT)
    assert result.verdict is Verdict.REDIRECT and result.location == "/"


def test_query_token_api_client_is_proxied_without_token(auth: Authenticator) -> None:
    result = auth.check(request(f"/v1/models?token={TOKEN}", Accept="application/json"), PORT)
    assert result.verdict is Verdict.ALLOW
    assert result.strip_token and result.set_cookie


def test_wrong_query_token_is_denied(auth: Authenticator) -> None:
    assert auth.check(request(f"/?token={TOKEN}x", Accept="text/html"), PORT).verdict is Verdict.DENY
    assert auth.check(request("/?token=", Accept="text/html"), PORT).verdict is Verdict.DENY


@pytest.mark.parametrize("token", [TOKEN, PASSWORD])
def test_cookie_with_either_token(auth: Authenticator, token: str) -> None:
    result = auth.check(request(Cookie=f"a=b; portal_auth_token={token}; c=d"), PORT)
    assert result.verdict is Verdict.ALLOW and not result.set_cookie


@pytest.mark.parametrize(
    "cookie",
    [
        f"portal_auth_token={TOKEN}x",
        f"portal_auth_token=x{TOKEN}",
        f"xportal_auth_token={TOKEN}",
        f"portal_auth_tokenx={TOKEN}",
        f'other="portal_auth_token={TOKEN}"',
        f"other=portal_auth_token={TOKEN}",
        f"portal_auth_token=wrong; x={TOKEN}",
        f"C.1_auth_token={TOKEN}",
        "portal_auth_token=",
    ],
)
def test_forged_and_substring_cookies_are_denied(auth: Authenticator, cookie: str) -> None:
    assert auth.check(request(Cookie=cookie), PORT).verdict is Verdict.DENY


def test_cookie_name_follows_container_label(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, VAST_CONTAINERLABEL="C.1")
    assert auth.check(request(Cookie=f"C.1_auth_token={TOKEN}"), PORT).verdict is Verdict.ALLOW
    assert auth.check(request(Cookie=f"portal_auth_token={TOKEN}"), PORT).verdict is Verdict.DENY


@pytest.mark.parametrize("token", [TOKEN, PASSWORD])
def test_bearer_with_either_token(auth: Authenticator, token: str) -> None:
    assert auth.check(request(Authorization=f"Bearer {token}"), PORT).verdict is Verdict.ALLOW


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Token {TOKEN}"])
def test_wrong_bearer_is_denied(auth: Authenticator, header: str) -> None:
    assert auth.check(request(Authorization=header), PORT).verdict is Verdict.DENY


def test_basic_auth_sets_cookie(auth: Authenticator) -> None:
    result = auth.check(request(Authorization=basic("vastai", PASSWORD)), PORT)
    assert result.verdict is Verdict.ALLOW and result.set_cookie


@pytest.mark.parametrize(
    "header",
    [
        basic("root", PASSWORD),
        basic("vastai", PASSWORD + "x"),
        basic("vastai", ""),
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(PASSWORD.encode()).decode(),
    ],
)
def test_wrong_basic_auth_is_denied(auth: Authenticator, header: str) -> None:
    assert auth.check(request(Authorization=header), PORT).verdict is Verdict.DENY


def test_basic_auth_user_from_settings(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, WEB_USERNAME="alice")
    assert auth.check(request(Authorization=basic("alice", PASSWORD)), PORT).verdict is Verdict.ALLOW
    assert auth.check(request(Authorization=basic("vastai", PASSWORD)), PORT).verdict is Verdict.DENY


def test_auth_exclude_and_enable_auth(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, AUTH_EXCLUDE="8080")
    assert auth.check(request(), 8080).verdict is Verdict.OPEN
    assert auth.check(request(), PORT).verdict is Verdict.DENY
    off = authenticator(tmp_path, ENABLE_AUTH="false")
    assert off.check(request(), PORT).verdict is Verdict.OPEN


def test_unauthorized_response(auth: Authenticator) -> None:
    response = auth.unauthorized()
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="restricted"'


@pytest.mark.parametrize("is_secure", [False, True])
def test_cookie_attributes(auth: Authenticator, is_secure: bool) -> None:
    response = web.Response()
    auth.set_cookie(response, is_secure)
    header = response.headers["Set-Cookie"]
    expected = f"portal_auth_token={TOKEN}; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax"
    assert header == expected + ("; Secure" if is_secure else "")


@pytest.mark.parametrize("token", ["abc,def-123456", 'a"b\\c-123456', "t\u00e9st-123456", "a b c d e f"])
def test_the_cookie_set_is_accepted_back(tmp_path: Path, token: str) -> None:
    auth = authenticator(tmp_path, OPEN_BUTTON_TOKEN=token, WEB_PASSWORD="")
    name_value = auth.cookie_header(is_secure=True).split("; ")[0]
    assert auth.check(request(Cookie=name_value), PORT).verdict is Verdict.ALLOW


def test_non_ascii_basic_credentials_are_refused(auth: Authenticator) -> None:
    assert auth.check(request(Authorization="Basic \u00e9t\u00e9"), PORT).verdict is Verdict.DENY


def test_token_redirect_stays_on_this_site(auth: Authenticator) -> None:
    for path in ("//evil.example/x", "/\\evil.example/x"):
        result = auth.check(request(f"{path}?token={TOKEN}", Accept="text/html"), PORT)
        assert result.location is not None and not result.location.startswith(("//", "/\\"))


def test_token_removal_keeps_the_rest_of_the_query_as_sent(auth: Authenticator) -> None:
    result = auth.check(request(f"/v1/x?token={TOKEN}&q=a%20b&x=1&x=2&e=%26%3D&flag"), PORT)
    assert result.strip_token
    assert url_without_token(request(f"/v1/x?token={TOKEN}&q=a%20b&x=1&x=2&e=%26%3D&flag")) == (
        "/v1/x?q=a%20b&x=1&x=2&e=%26%3D&flag"
    )
    assert url_without_token(request(f"/v1/x?to%6Ben={TOKEN}")) == "/v1/x"


def test_parse_cookie_header_is_exact() -> None:
    assert parse_cookie_header('a=1; b="x y"; junk; =v; c=') == [("a", "1"), ("b", "x y"), ("c", "")]


def test_without_cookie_removes_only_that_name() -> None:
    assert without_cookie("a=1; portal_auth_token=t; portal_auth_tokenx=2", "portal_auth_token") == (
        "a=1; portal_auth_tokenx=2"
    )
