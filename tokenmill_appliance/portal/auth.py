"""The edge's authentication rules (spec section 3), as a pure decision on a request.

Order on an auth-enabled port: open paths; `?token=`; the auth cookie; `Authorization: Bearer`; basic
auth; else 401. Every secret comparison is constant-time, and cookies are parsed exactly (a cookie whose
name or value merely contains the token never matches).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
from dataclasses import dataclass
from urllib.parse import unquote_plus

from aiohttp import web

from tokenmill_appliance.settings import Settings

OPEN_PATHS = frozenset(
    {"/portal-resolver", "/manifest.json", "/site.webmanifest", "/.well-known/security.txt"}
)
OPEN_PREFIXES = ("/.well-known/acme-challenge/",)
COOKIE_MAX_AGE = 604800


class Verdict(enum.Enum):
    OPEN = "open"
    """No auth needed (open path, excluded port or auth disabled)."""
    ALLOW = "allow"
    """Credentials matched."""
    REDIRECT = "redirect"
    """A browser came with a right `?token=`: set the cookie and redirect to the URL without it."""
    DENY = "deny"


@dataclass(frozen=True)
class AuthResult:
    verdict: Verdict
    set_cookie: bool = False
    """Send the auth cookie with the response (after `?token=` or basic auth)."""
    location: str | None = None
    """For REDIRECT: the same URL without `token`."""
    strip_token: bool = False
    """Proxy with `token` removed from the query."""

    @property
    def is_allowed(self) -> bool:
        return self.verdict in (Verdict.OPEN, Verdict.ALLOW)

    @property
    def is_authenticated(self) -> bool:
        return self.verdict in (Verdict.ALLOW, Verdict.REDIRECT)


def secret_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def parse_cookie_header(header: str) -> list[tuple[str, str]]:
    """`a=1; b=2` as exact (name, value) pairs, in order; malformed pieces are skipped."""
    pairs = []
    for piece in header.split(";"):
        name, sep, value = piece.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        pairs.append((name, value))
    return pairs


def without_cookie(header: str, name: str) -> str:
    """The Cookie header with every `name=` pair removed (the auth cookie is not the apps' business)."""
    return "; ".join(f"{n}={v}" for n, v in parse_cookie_header(header) if n != name)


def is_open_path(path: str) -> bool:
    """`path` (decoded) is served without auth. Never with a `.` or `..` segment: the backend would see
    `/.well-known/acme-challenge/../../v1/x` as `/v1/x`."""
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_browser_navigation(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "") or (
        request.headers.get("Sec-Fetch-Dest", "").lower() == "document"
    )


def url_without_token(request: web.Request) -> str:
    """The request's raw path and query without its `token` parameters, the rest kept byte for byte."""
    pairs = request.rel_url.raw_query_string.split("&")
    kept = [pair for pair in pairs if pair and unquote_plus(pair.partition("=")[0]) != "token"]
    return same_site(request.rel_url.raw_path) + (f"?{'&'.join(kept)}" if kept else "")


def same_site(path: str) -> str:
    """`path` fit for a Location header: `//host/x` or `/\\host/x` would send the browser to another site."""
    return "/" + path.lstrip("/\\")


class Authenticator:
    """Decides, per request, what the edge does; knows the tokens and never logs them."""

    def __init__(self, settings: Settings) -> None:
        self._tokens = settings.tokens
        self._username = settings.web_username
        self._password = settings.web_password
        self._cookie_token = settings.open_button_token
        self.cookie_name = settings.cookie_name
        self._enabled = settings.enable_auth
        self._excluded = settings.auth_exclude

    def is_token(self, value: str) -> bool:
        # Compare with every token (no early exit) so timing says nothing about which one matched.
        matches = [secret_equal(value, token) for token in self._tokens]
        return any(matches) and bool(value)

    def is_port_open(self, port: int) -> bool:
        return not self._enabled or port in self._excluded

    def check(self, request: web.Request, port: int) -> AuthResult:
        if self.is_port_open(port) or is_open_path(request.path):
            return AuthResult(Verdict.OPEN)
        query_tokens = request.query.getall("token", [])
        if any(self.is_token(t) for t in query_tokens):
            if is_browser_navigation(request):
                return AuthResult(Verdict.REDIRECT, set_cookie=True, location=url_without_token(request))
            return AuthResult(Verdict.ALLOW, set_cookie=True, strip_token=True)
        if self._has_cookie(request) or self.has_bearer(request):
            return AuthResult(Verdict.ALLOW)
        if self._has_basic(request):
            return AuthResult(Verdict.ALLOW, set_cookie=True)
        return AuthResult(Verdict.DENY)

    def _has_cookie(self, request: web.Request) -> bool:
        found = False
        for header in request.headers.getall("Cookie", []):
            for name, value in parse_cookie_header(header):
                if name == self.cookie_name and self.is_token(value):
                    found = True
        return found

    def has_bearer(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and self.is_token(value.strip())

    def has_own_credential(self, request: web.Request) -> bool:
        """The request's Authorization header is the portal's: a Bearer token or the basic-auth login."""
        return self.has_bearer(request) or self._has_basic(request)

    def _has_basic(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII base64 (UnicodeDecodeError is one)
            return False
        user, sep, password = decoded.partition(":")
        user_ok = secret_equal(user, self._username)
        password_ok = secret_equal(password, self._password)
        return bool(sep) and user_ok and password_ok and bool(self._password)

    def cookie_header(self, is_secure: bool) -> str:
        """The Set-Cookie value, as the spec writes it: the token verbatim (settings strip the CR, LF and
        `;` that would end it), so that the cookie a browser sends back is the token itself."""
        attributes = f"Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"
        return f"{self.cookie_name}={self._cookie_token}; {attributes}" + ("; Secure" if is_secure else "")

    def set_cookie(self, response: web.StreamResponse, is_secure: bool) -> None:
        response.headers.add("Set-Cookie", self.cookie_header(is_secure))

    def redirect(self, result: AuthResult, is_secure: bool) -> web.Response:
        """The answer to a browser that came with a right `?token=`: the cookie and the URL without it."""
        response = web.Response(
            status=302, headers={"Location": result.location or "/", "Cache-Control": "no-store"}
        )
        self.set_cookie(response, is_secure)
        return response

    def unauthorized(self) -> web.Response:
        return web.Response(
            status=401,
            text="401 Unauthorized: open the link with ?token=, or log in.\n",
            headers={"WWW-Authenticate": 'Basic realm="restricted"', "Cache-Control": "no-store"},
        )
