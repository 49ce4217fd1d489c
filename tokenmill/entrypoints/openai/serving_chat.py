"""POST /v1/chat/completions: chat template -> engine -> message (or SSE deltas), with reasoning split."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.engine.processor import TokensPrompt
from tokenmill.entrypoints.openai.errors import APIError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
from tokenmill.entrypoints.openai.reasoning import ReasoningStream, get_reasoning_parser
from tokenmill.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    ServingContext,
    clamp_logprob,
    decoded_token,
    first_and_rest,
    prompt_logprobs_json,
    sse,
    sse_stream,
    top_entries,
    with_disconnect,
)


def render_chat_prompt(ctx: ServingContext, request: Any, conversation: list[dict[str, Any]]) -> str:
    """The prompt text the chat template makes of `conversation` (runs on the tokenizer thread)."""
    from tokenmill.tokenizer.chat import apply_chat_template, is_inline_template

    requested = getattr(request, "chat_template", None)
    if requested is not None and not ctx.trust_request_chat_template:
        # As vLLM: a template runs on the server (a loop in it can hold the tokenizer thread for minutes).
        raise ValueError(
            "chat_template in a request needs the server started with --trust-request-chat-template"
        )
    if requested is not None and not is_inline_template(requested):
        # Never a path: a client could have any file the server can read rendered into its prompt.
        raise ValueError("chat_template must be the Jinja template itself (a request cannot name a file)")
    try:
        return apply_chat_template(
            ctx.tokenizer,
            conversation,
            chat_template=requested or ctx.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            **(request.chat_template_kwargs or {}),
        )
    except ValueError:
        raise
    except Exception as err:  # a template error is the request's problem, not the server's
        raise ValueError(f"the chat template failed on these messages: {type(err).__name__}: {err}") from None


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.reasoning = get_reasoning_parser(ctx.reasoning_parser)

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.ctx.check_model(request.model)
        engine = self.ctx.engine
        try:
            params = request.to_sampling_params(self.ctx.default_sampling, self.ctx.max_logprobs)
            conversation = request.conversation()
            text = await engine.run_in_executor(render_chat_prompt, self.ctx, request, conversation)
            keep = request.kept_prompt_tokens(engine.max_model_len)
            token_ids = await self.ctx.encode(text, request.add_special_tokens, keep)
            if keep is not None:
                text = await engine.run_in_executor(self.ctx.tokenizer.decode, token_ids)
            is_explicit = request.requested_max_tokens is not None
            params = self.ctx.fit_default_max_tokens(params, is_explicit, len(token_ids))
        except ValueError as err:
            raise APIError.bad_request(err) from None
        request_id = random_id("chatcmpl")
        self.ctx.log_request(request_id, len(token_ids), params)
        prompt = TokensPrompt(prompt=text, prompt_token_ids=token_ids)
        generator = engine.generate(prompt, params, request_id)
        if request.stream:
            events = self._stream(
                request, await first_and_rest(generator), request_id, model, params.n, len(token_ids)
            )
            return StreamingResponse(sse_stream(events), media_type="text/event-stream")
        body = await with_disconnect(raw_request, self._collect(request, generator, request_id, model))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _collect(
        self,
        request: ChatCompletionRequest,
        generator: AsyncGenerator[RequestOutput, None],
        request_id: str,
        model: str,
    ) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async for output in generator:
            final = output
        assert final is not None
        choices = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            reasoning, content = self.reasoning.split(out.text) if self.reasoning else (None, out.text)
            choices.append(
                ChatCompletionResponseChoice(
                    index=out.index,
                    message=ChatResponseMessage(content=content, reasoning_content=reasoning),
                    logprobs=self._logprobs(request, out),
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                )
            )
        num_prompt = len(final.prompt_token_ids)
        num_generated = sum(len(out.token_ids) for out in final.outputs)
        usage = self.ctx.usage(num_prompt, num_generated, final.num_cached_tokens)
        prompt_logprobs = (
            prompt_logprobs_json(final.prompt_logprobs) if request.prompt_logprobs is not None else None
        )
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices, usage=usage, prompt_logprobs=prompt_logprobs
        )

    def _logprobs(
        self, request: ChatCompletionRequest, out: CompletionOutput
    ) -> ChatCompletionLogProbs | None:
        if not request.logprobs:
            return None
        content = []
        as_ids = self.ctx.tokens_as_ids(request)
        for token_id, step in zip(out.token_ids, out.logprobs or [], strict=False):
            content.append(self._token_logprob(token_id, step, request.top_logprobs or 0, as_ids))
        return ChatCompletionLogProbs(content=content)

    def _token_logprob(
        self, token_id: int, step: dict[int, Logprob], num_top: int, as_ids: bool
    ) -> ChatCompletionLogProb:
        tokenizer = self.ctx.tokenizer
        chosen = step.get(token_id)
        token = decoded_token(tokenizer, token_id, chosen, as_ids)
        top = [
            TopLogprob(
                token=(t := decoded_token(tokenizer, tid, lp, as_ids)),
                logprob=clamp_logprob(lp.logprob),
                bytes=list(t.encode("utf-8", errors="replace")),
            )
            for tid, lp in top_entries(step, num_top)
        ]
        return ChatCompletionLogProb(
            token=token,
            logprob=clamp_logprob(chosen.logprob) if chosen is not None else MIN_LOGPROB,
            bytes=list(token.encode("utf-8", errors="replace")),
            top_logprobs=top,
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        generator: AsyncGenerator[RequestOutput, None],
        request_id: str,
        model: str,
        n: int,
        num_prompt_tokens: int,
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())
        streams: dict[int, ReasoningStream] = (
            {i: self.reasoning.stream() for i in range(n)} if self.reasoning else {}
        )
        usage = UsageInfo(prompt_tokens=num_prompt_tokens)  # the role chunk's usage counts the prompt
        num_cached = 0
        continuous = request.stream_options is not None and request.stream_options.continuous_usage_stats

        def chunk(choices: list[ChatCompletionStreamChoice]) -> str:
            body = ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices)
            if continuous:
                body.usage = self.ctx.usage(usage.prompt_tokens, usage.completion_tokens, num_cached)
            return sse(body)

        role = DeltaMessage(role="assistant", content="")
        yield chunk([ChatCompletionStreamChoice(index=i, delta=role) for i in range(n)])
        try:
            async for output in generator:
                num_cached = output.num_cached_tokens
                for out in output.outputs:
                    usage.completion_tokens += len(out.token_ids)
                    choice = self._delta_choice(request, out, streams.get(out.index))
                    if choice is not None:
                        yield chunk([choice])
        finally:
            await generator.aclose()
        if self.ctx.streams_usage(request):
            totals = self.ctx.usage(usage.prompt_tokens, usage.completion_tokens, num_cached)
            body = ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=totals
            )
            yield sse(body)

    def _delta_choice(
        self, request: ChatCompletionRequest, out: CompletionOutput, stream: ReasoningStream | None
    ) -> ChatCompletionStreamChoice | None:
        finished = out.finish_reason is not None
        reasoning, content = stream.feed(out.text, final=finished) if stream else (None, out.text or None)
        has_logprobs = request.logprobs and bool(out.logprobs)
        if not finished and reasoning is None and content is None and not has_logprobs:
            return None
        delta = DeltaMessage(content=content, reasoning_content=reasoning)
        if content is None and reasoning is None:
            # Text held back (a possible stop string, a character's missing bytes): the chunk still
            # carries its tokens' logprobs, as vLLM's does.
            delta = DeltaMessage(content="")
        return ChatCompletionStreamChoice(
            index=out.index,
            delta=delta,
            logprobs=self._logprobs(request, out),
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )
