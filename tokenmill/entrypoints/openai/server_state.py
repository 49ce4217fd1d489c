"""What the server holds: the engine once loaded, the serving objects, metrics, and the load itself."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.core_client import EngineCoreClient
from tokenmill.entrypoints.cli_args import ServeArgs
from tokenmill.entrypoints.openai.errors import APIError
from tokenmill.entrypoints.openai.serving_chat import OpenAIServingChat
from tokenmill.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tokenmill.entrypoints.openai.serving_engine import ServingContext
from tokenmill.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from tokenmill.metrics.prometheus import PrometheusMetrics
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.sampling_params import from_generation_config

logger = logging.getLogger("tokenmill.server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
ENGINE_DEATH_GRACE_S = 10.0
"""How long a server whose engine core died answers 503 (saying why) before it exits."""


@dataclass
class Servers:
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization


@dataclass
class LoadedModel:
    tokenizer: Any
    eos_token_ids: frozenset[int]
    default_sampling: dict[str, Any]
    root: str
    max_token_bytes: int | None


class ServerState:
    def __init__(self, args: ServeArgs, client_factory: Any = EngineCoreClient) -> None:
        self.args = args
        self.client_factory = client_factory  # the core process's client (tests pass a fake core)
        self.engine_config = args.engine_args.create_engine_config()
        self.model_root = args.engine_args.model or DEFAULT_MODEL_NAME
        self.model_names = args.served_model_names or [self.model_root]
        self.engine: AsyncLLM | None = None
        self.load_error: str | None = None
        self.engine_death: str | None = None
        """Why the engine core died after the model loaded, when the server stops for it."""
        self.engine_death_grace_s = ENGINE_DEATH_GRACE_S
        self.server: Any = None  # the uvicorn.Server, stopped when the model cannot load
        self._servers: Servers | None = None
        self.metrics = PrometheusMetrics(self.model_names[0], self._stats)

    def _stats(self) -> SchedulerStats:
        return self.engine.get_stats() if self.engine is not None else SchedulerStats()

    @property
    def is_healthy(self) -> bool:
        return self.engine is not None and self.engine.is_ready and self._servers is not None

    @property
    def unhealthy_reason(self) -> str:
        if self.engine is not None and self.engine.errored:
            return f"the engine is not running: {self.engine.error_message}"
        return "the model is still loading"

    def servers(self) -> Servers:
        """The serving objects, or 503 while the model loads or after the engine died."""
        if not self.is_healthy or self._servers is None:
            raise APIError(
                self.unhealthy_reason, 503, code="engine_unavailable", headers={"Retry-After": "1"}
            )
        return self._servers

    async def load(self) -> None:
        """Loads the tokenizer here and the model in the core process; stops the server on failure."""
        try:
            self.engine = AsyncLLM(
                self.engine_config,
                tokenizer=None,
                eos_token_ids=frozenset(),
                max_logprobs=self.args.max_logprobs,
                stat_loggers=[self.metrics],
                client_factory=self.client_factory,
                on_failure=self._on_engine_failure,
            )
            self.engine.launch()  # the core loads the model while this process loads the tokenizer
            loaded = await asyncio.to_thread(self._load_tokenizer)
            self.model_root = loaded.root
            self.engine.set_tokenizer(loaded.tokenizer, loaded.eos_token_ids)
            await self.engine.start()
            from tokenmill.tokenizer import warn_if_vocabulary_outgrows  # loaded: transformers is in

            warn_if_vocabulary_outgrows(loaded.tokenizer, self.engine.vocab_size)
        except Exception as err:
            self.load_error = str(err) or type(err).__name__
            if self.server is not None:
                self.server.should_exit = True
            return
        ctx = ServingContext(
            engine=self.engine,
            tokenizer=loaded.tokenizer,
            served_model_names=self.model_names,
            default_sampling=loaded.default_sampling,
            chat_template=self.args.chat_template,
            trust_request_chat_template=self.args.trust_request_chat_template,
            reasoning_parser=self.args.reasoning_parser,
            log_requests=self.args.enable_log_requests,
            max_token_bytes=loaded.max_token_bytes,
            max_logprobs=self.args.max_logprobs,
            return_tokens_as_token_ids=self.args.return_tokens_as_token_ids,
            enable_prompt_tokens_details=self.args.enable_prompt_tokens_details,
            enable_force_include_usage=self.args.enable_force_include_usage,
        )
        self._servers = Servers(
            OpenAIServingCompletion(ctx), OpenAIServingChat(ctx), OpenAIServingTokenization(ctx)
        )
        await self._announce()

    def _on_engine_failure(self, reason: str) -> None:
        """The core died. While loading, `load()` reports it. Once serving, /health and every request say
        why with a 503 for `engine_death_grace_s`, then the server stops with exit status 1 so that its
        supervisor starts a fresh one, as vLLM's does; one kept alive goes on answering 503."""
        if self._servers is None or self.args.keep_alive_on_engine_death or self.engine_death is not None:
            return
        logger.error(
            "the engine core died (%s): the server stops in %.0f s, for its supervisor to restart it",
            reason,
            self.engine_death_grace_s,
        )
        self.engine_death = reason
        asyncio.get_running_loop().call_later(self.engine_death_grace_s, self._stop_serving)

    def _stop_serving(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    def _load_tokenizer(self) -> LoadedModel:
        from tokenmill.loader import ModelSource, resolve_model, resolve_tokenizer
        from tokenmill.tokenizer import load_generation_config, load_tokenizer, longest_token_bytes

        engine_args = self.args.engine_args
        source = resolve_model(engine_args.model, engine_args.download_dir, engine_args.revision)
        tokenizer_source = resolve_tokenizer(
            engine_args.tokenizer, source, engine_args.download_dir, engine_args.tokenizer_revision
        )
        tokenizer = load_tokenizer(tokenizer_source, self.args.chat_template)
        defaults = load_generation_config(source, tokenizer)
        sampling: dict[str, Any] = {}
        mode = self.args.generation_config
        if mode != "vllm":
            chosen = defaults  # auto: the model's own; else a directory holding a generation_config.json
            if mode != "auto":
                chosen = load_generation_config(ModelSource(name=mode, path=Path(mode)), tokenizer)
            sampling = chosen.sampling_param_defaults()
        sampling |= from_generation_config(self.args.override_generation_config)
        return LoadedModel(
            tokenizer, defaults.eos_token_ids, sampling, source.name, longest_token_bytes(tokenizer)
        )

    async def _announce(self) -> None:
        server = self.server
        while server is not None and not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        host = self.args.host if ":" not in self.args.host else f"[{self.args.host}]"
        print(
            f"tokenmill: serving {self.model_names[0]} at http://{host}:{self.args.port}/v1 (ready)",
            flush=True,
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
