"""OpenAI's error body for every failure, and the exception handlers that produce it.

Bad input never reaches a 500: request validation, JSON and content-type problems are 400s, unknown
routes and models 404s, a full queue or a loading/dead engine 503s with a Retry-After hint.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tokenmill.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to return to the client as `{"error": {...}}` with `status_code`."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def bad_request(cls, err: ValueError) -> APIError:
        """The 400 of an invalid value; `param` from the error when it names one (sampling parameters)."""
        return cls(str(err), 400, param=getattr(err, "param", None))


def error_body(
    message: str, status_code: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    info = ErrorInfo(
        message=message,
        type=ERROR_TYPES.get(status_code, "server_error"),
        param=param,
        code=code or _status_code_name(status_code),
    )
    return ErrorResponse(error=info).model_dump()


def _status_code_name(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.message, error.status_code, error.param, error.code)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = err.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    prefix = f"{param}: " if param else ""
    return APIError(f"{prefix}{first.get('msg', 'invalid value')}", 400, param=param)


THREAD_PARSE_BYTES = 256 * 1024
"""Bodies from this size are parsed and validated in a worker thread: megabytes of JSON would hold the
event loop (every other stream, /health) for a second or more."""


async def parse_json_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Reads and validates a JSON body of at most `max_bytes`; too large is a 413, any other fault a 400."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(f"unsupported content type {content_type or '(none)'!r}: send application/json", 400)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(f"unsupported content encoding {encoding!r}: send the JSON body uncompressed", 415)
    raw = await read_body(request, max_bytes)
    if len(raw) >= THREAD_PARSE_BYTES:
        return await run_in_threadpool(parse_json, raw, model)
    return parse_json(raw, model)


def parse_json(raw: bytes, model: type[ModelT]) -> ModelT:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"malformed JSON body: {err}", 400) from None
    except RecursionError:
        raise APIError("malformed JSON body: nested too deeply", 400) from None
    except ValueError as err:  # an integer literal of more digits than Python converts
        raise APIError(f"malformed JSON body: {err}", 400) from None
    if not isinstance(data, dict):
        raise APIError("the JSON body must be an object", 400)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None
    except RecursionError:
        raise APIError("the request is nested too deeply", 400) from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (413) as soon as its declared or received size passes `max_bytes`:
    a body too large is never held whole."""
    too_large = APIError(
        f"the request body is larger than this server accepts ({max_bytes} bytes): send less, or start "
        "the server with a larger --max-request-body-size",
        413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: nginx's 499, without a traceback
        message = "the client closed the connection before its request body arrived"
        raise APIError(message, 499, code="client_closed_request") from None
    return b"".join(chunks)


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = str(exc.detail) if status != 404 else f"no route {request.method} {request.url.path}"
    return error_response(APIError(message, status, headers=getattr(exc, "headers", None)))


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return error_response(APIError(f"internal error: {type(exc).__name__}", 500))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
