"""What the serving classes share: the engine and model names, error mapping, SSE framing, logprobs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError
from tokenmill.engine.outputs import Logprob, PromptLogprobs
from tokenmill.entrypoints.openai.errors import APIError, error_body
from tokenmill.entrypoints.openai.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from tokenmill.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("tokenmill.requests")

T = TypeVar("T")
RETRY_AFTER_S = 1
MIN_LOGPROB = -9999.0  # JSON has no -inf


@dataclass
class ServingContext:
    """The engine and the settings every endpoint needs."""

    engine: AsyncLLM
    tokenizer: Any
    served_model_names: list[str]
    default_sampling: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    trust_request_chat_template: bool = False  # a request's own template runs on the server: opt-in
    reasoning_parser: str | None = None
    log_requests: bool = False
    max_token_bytes: int | None = None  # `longest_token_bytes` of the tokenizer; None: no bound
    max_logprobs: int = MAX_TOP_LOGPROBS  # --max-logprobs; -1: no limit
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids
    enable_prompt_tokens_details: bool = False  # --enable-prompt-tokens-details
    enable_force_include_usage: bool = False  # --enable-force-include-usage

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        details = (
            PromptTokensDetails(cached_tokens=cached_tokens) if self.enable_prompt_tokens_details else None
        )
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )

    def streams_usage(self, request: SamplingFields) -> bool:
        """Whether a stream ends with a usage chunk: asked for (stream_options), or always (the flag)."""
        options = request.stream_options
        return self.enable_force_include_usage or (options is not None and options.include_usage)

    def tokens_as_ids(self, request: SamplingFields) -> bool:
        """Whether logprobs name tokens by id for this request (its own field, or the server's flag)."""
        return self.return_tokens_as_token_ids or request.return_tokens_as_token_ids

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        """The served name a request's `model` refers to (the first when omitted); 404 if unknown."""
        if not name:
            return self.model_name
        if name not in self.served_model_names:
            raise APIError(
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                404,
                param="model",
                code="model_not_found",
            )
        return name

    async def encode(self, text: str, add_special_tokens: bool, keep: int | None = None) -> list[int]:
        """The token ids of a prompt's text, on the tokenizer thread; a text too long for any prompt is
        refused before tokenizing it (a few MB of text hold the thread for seconds), unless only its last
        `keep` tokens are wanted (truncate_prompt_tokens; the request body's limit bounds it then)."""
        max_len, num_bytes = self.engine.max_model_len, len(text.encode("utf-8"))
        too_long = self.max_token_bytes is not None and num_bytes > max_len * self.max_token_bytes
        if too_long and keep is None:
            raise ValueError(
                f"the prompt is {num_bytes} bytes, more than this model's maximum context length of "
                f"{max_len} tokens can hold (a token covers at most {self.max_token_bytes} bytes): "
                "shorten the prompt"
            )
        ids = await self.engine.run_in_executor(encode, self.tokenizer, text, add_special_tokens)
        return ids if keep is None else ids[-keep:]

    def check_prompt_length(self, num_tokens: int) -> None:
        """Refuses a token-id prompt longer than the context before any work is done on it."""
        if num_tokens > self.engine.max_model_len:
            raise ValueError(
                f"the prompt has {num_tokens} tokens, more than this model's maximum context length of "
                f"{self.engine.max_model_len} tokens: shorten the prompt"
            )

    def fit_default_max_tokens(
        self, params: SamplingParams, is_explicit: bool, num_prompt_tokens: int
    ) -> SamplingParams:
        """A max_tokens the request did not set (the model's generation_config max_new_tokens) shrinks to
        the room its prompt leaves, as vLLM's does; one the request set is checked as given."""
        room = self.engine.max_model_len - num_prompt_tokens
        if is_explicit or params.max_tokens is None or not 1 <= room < params.max_tokens:
            return params
        return dataclasses.replace(params, max_tokens=room)

    def log_request(self, request_id: str, num_prompt_tokens: int, params: Any) -> None:
        if self.log_requests:
            request_logger.info(
                "request %s: %d prompt tokens, n=%s, max_tokens=%s, temperature=%s",
                request_id,
                num_prompt_tokens,
                params.n,
                params.max_tokens,
                params.temperature,
            )


def engine_error(err: Exception) -> APIError:
    """The HTTP error an engine exception becomes."""
    if isinstance(err, ValueError):
        return APIError.bad_request(err)
    if isinstance(err, EngineOverloadedError):
        return APIError(str(err), 503, code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(err, EngineDeadError):
        return APIError(str(err), 503, code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    raise err


async def first_and_rest(generator: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Awaits the first item now (so errors surface as HTTP errors), then yields it and the rest."""
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        first = None
    except (ValueError, EngineOverloadedError, EngineDeadError) as err:
        raise engine_error(err) from None

    async def chained() -> AsyncGenerator[T, None]:
        try:
            if first is not None:
                yield first
                async for item in generator:
                    yield item
        finally:
            await generator.aclose()

    return chained()


async def start_all(generators: list[AsyncGenerator[T, None]]) -> list[AsyncGenerator[T, None]]:
    """`first_and_rest` for several generators at once; if one fails, the others are closed."""
    started = await asyncio.gather(*(first_and_rest(g) for g in generators), return_exceptions=True)
    failures = [r for r in started if isinstance(r, BaseException)]
    if failures:
        for result in started:
            if not isinstance(result, BaseException):
                await result.aclose()
        raise failures[0]
    return [r for r in started if not isinstance(r, BaseException)]


async def merge_async_iterators(*iterators: AsyncGenerator[T, None]) -> AsyncGenerator[tuple[int, T], None]:
    """Yields (index, item) from several generators as items arrive; closing it closes them all."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[index]))] = index
                yield index, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            await it.aclose()


async def with_disconnect(raw_request: Request, handler: Awaitable[T]) -> T:
    """Runs `handler`, cancelling it (which aborts its engine requests) if the client disconnects."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})  # until it has aborted its engine requests and is really cancelled
    if work.cancelled():
        raise APIError("the client disconnected", 499, code="client_disconnected")
    try:
        return work.result()
    except (ValueError, EngineOverloadedError, EngineDeadError) as err:
        raise engine_error(err) from None


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>\\n\\n`."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        data = json.dumps(payload, separators=(",", ":"))
    else:
        data = payload
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Frames a stream's events, turning a failure mid-stream into an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except APIError as err:
        yield sse(error_body(err.message, err.status_code, err.param, err.code))
    except (ValueError, EngineOverloadedError, EngineDeadError) as err:
        api_error = engine_error(err)  # the same body as before the stream started, code included
        yield sse(error_body(api_error.message, api_error.status_code, api_error.param, api_error.code))
    yield SSE_DONE


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text` (called on the tokenizer thread)."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def decoded_token(tokenizer: Any, token_id: int, logprob: Logprob | None, as_id: bool = False) -> str:
    """A logprob entry's token: its text, or `token_id:N` (vLLM's return_tokens_as_token_ids), which
    names tokens whose bytes are no whole character."""
    if as_id:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return str(tokenizer.decode([token_id]))


def prompt_logprobs_json(
    prompt_logprobs: PromptLogprobs | None,
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's JSON shape of prompt logprobs (None when they were not asked for)."""
    if prompt_logprobs is None:
        return None
    return [
        None
        if step is None
        else {
            str(token_id): {
                "logprob": clamp_logprob(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token_id, lp in step.items()
        }
        for step in prompt_logprobs
    ]


def top_entries(step: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    """The top `num_top` entries of one position's logprobs, most likely first."""
    ranked = [(token_id, lp) for token_id, lp in step.items() if lp.rank is not None and lp.rank <= num_top]
    return sorted(ranked, key=lambda entry: entry[1].rank or 0)
