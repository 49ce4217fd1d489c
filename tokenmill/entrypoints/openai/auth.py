"""Bearer-key authentication as plain ASGI middleware (health, metrics and version stay open)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.entrypoints.openai.errors import APIError, error_response

# As in vLLM, the API's own description is open too: a browser opening /docs sends no key.
OPEN_PATHS = frozenset(
    {"/health", "/metrics", "/version", "/ping", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


class APIKeyMiddleware:
    """Rejects requests without `Authorization: Bearer <one of the keys>` with 401 (when keys are set)."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.expected = [f"Bearer {key}".encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.expected or scope["type"] != "http" or not self._needs_key(scope):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        # Every key compared (no early exit), so that timing says nothing about which one matched.
        if any([hmac.compare_digest(given, expected) for expected in self.expected]):
            await self.app(scope, receive, send)
            return
        error = APIError(
            "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
            401,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(error)(scope, receive, send)

    @staticmethod
    def _needs_key(scope: Scope) -> bool:
        return scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS
