"""The OpenAI-compatible HTTP server: `tokenmill serve`.

uvicorn starts at once; the model loads in the background (the core in its own process), and /health
turns 200 only when it is ready (503 while loading or after the core died). A model that fails to load
stops the server with the reason and exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from tokenmill import __version__, logging_config
from tokenmill.engine.core_client import EngineCoreClient
from tokenmill.entrypoints.cli_args import ServeArgs
from tokenmill.entrypoints.openai.auth import APIKeyMiddleware
from tokenmill.entrypoints.openai.errors import APIError, install_error_handlers, parse_json_body
from tokenmill.entrypoints.openai.openapi import document_request_bodies
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from tokenmill.entrypoints.openai.server_state import ServerState

logger = logging.getLogger("tokenmill.server")


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(state.load())
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loader
            state.shutdown()

    docs = not state.args.disable_fastapi_docs  # /docs is the portal's link to the API (portal.yaml)
    app = FastAPI(
        title="tokenmill",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    _add_routes(app, state)
    document_request_bodies(
        app,
        {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
            "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest,
        },
    )
    app.add_middleware(APIKeyMiddleware, api_keys=state.args.api_keys)
    if state.args.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=state.args.allowed_origins, allow_methods=["*"], allow_headers=["*"]
        )
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    max_body = state.args.max_request_body_size

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) name for the same check
    @app.post("/ping")
    async def health() -> Response:
        if state.is_healthy:
            return Response(status_code=200)
        raise APIError(state.unhealthy_reason, 503, code="engine_unavailable", headers={"Retry-After": "1"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    def model_cards() -> list[ModelCard]:
        max_len = state.engine.max_model_len if state.engine is not None and state.engine.is_ready else None
        names = state.model_names
        return [ModelCard(id=name, root=state.model_root, max_model_len=max_len) for name in names]

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=model_cards()).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        card = next((card for card in model_cards() if card.id == model_id), None)
        if card is None:
            message = f"the model {model_id!r} does not exist; this server serves {state.model_names[0]!r}"
            raise APIError(message, 404, param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

    @app.post("/v1/completions")
    async def completions(raw_request: Request) -> Response:
        request = await parse_json_body(raw_request, CompletionRequest, max_body)
        return await state.servers().completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw_request: Request) -> Response:
        request = await parse_json_body(raw_request, ChatCompletionRequest, max_body)
        return await state.servers().chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(raw_request: Request) -> JSONResponse:
        request = await parse_json_body(raw_request, TokenizeRequest, max_body)
        response = await state.servers().tokenization.tokenize(request)
        return JSONResponse(response.model_dump(exclude_none=True))

    @app.post("/detokenize")
    async def detokenize(raw_request: Request) -> JSONResponse:
        request = await parse_json_body(raw_request, DetokenizeRequest, max_body)
        response = await state.servers().tokenization.detokenize(request)
        return JSONResponse(response.model_dump())

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(state.servers().tokenization.tokenizer_info())


def configure_logging(args: ServeArgs) -> None:
    logging_config.configure_logging()
    logging.getLogger("tokenmill.server").setLevel(logging.INFO)
    if args.enable_log_requests:
        logging.getLogger("tokenmill.requests").setLevel(logging.INFO)


def run_server(args: ServeArgs, client_factory: Any = EngineCoreClient) -> int:
    """Serves until SIGINT/SIGTERM; 1 when the model could not be loaded or the engine died.
    `client_factory` makes the engine core's client (`EngineCoreClient.adopt` hands over a core spawned
    earlier)."""
    configure_logging(args)
    state = ServerState(args, client_factory)
    config = uvicorn.Config(
        build_app(state),
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=args.access_log,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        root_path=args.root_path or "",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    state.server = server
    server.run()
    if state.load_error is not None:
        print(f"tokenmill serve: {state.load_error}", file=sys.stderr)
        return 1
    if state.engine_death is not None:
        return 1
    return 0 if server.started else 1
