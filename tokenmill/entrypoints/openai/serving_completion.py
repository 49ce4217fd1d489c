"""POST /v1/completions: one or many prompts (text or token ids), echo, logprobs, n, streaming."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.engine.processor import TokensPrompt
from tokenmill.entrypoints.openai.errors import APIError
from tokenmill.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    UsageInfo,
    random_id,
)
from tokenmill.entrypoints.openai.serving_engine import (
    ServingContext,
    clamp_logprob,
    decoded_token,
    merge_async_iterators,
    prompt_logprobs_json,
    sse,
    sse_stream,
    start_all,
    top_entries,
    with_disconnect,
)
from tokenmill.sampling_params import SamplingParams


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.ctx.check_model(request.model)
        try:
            params = request.to_sampling_params(self.ctx.default_sampling, self.ctx.max_logprobs)
            self._check_capacity(len(request.prompts()), params.n)
            prompts = await self._tokenize(request)
        except ValueError as err:
            raise APIError.bad_request(err) from None
        request_id = random_id("cmpl")
        generators = []
        for i, (text, token_ids) in enumerate(prompts):
            self.ctx.log_request(f"{request_id}-{i}", len(token_ids), params)
            prompt = TokensPrompt(prompt=text, prompt_token_ids=token_ids)
            fitted = self.ctx.fit_default_max_tokens(params, request.max_tokens is not None, len(token_ids))
            generator = self.ctx.engine.generate(prompt, fitted, f"{request_id}-{i}")
            generators.append(generator)
        if request.stream:
            merged = merge_async_iterators(*await start_all(generators))
            events = self._stream(request, params, merged, request_id, model, num_prompts=len(prompts))
            return StreamingResponse(sse_stream(events), media_type="text/event-stream")
        merged = merge_async_iterators(*generators)
        body = await with_disconnect(raw_request, self._collect(request, params, merged, request_id, model))
        return Response(body.model_dump_json(), media_type="application/json")

    def _check_capacity(self, num_prompts: int, n: int) -> None:
        """A request of more sequences than the server ever holds at once can never succeed: refused
        before any prompt is tokenized (a 503 "retry" would be a lie, and a million prompts hours of work)."""
        most = self.ctx.engine.max_in_flight
        if num_prompts * n > most:
            raise ValueError(
                f"{num_prompts} prompts x n={n} are {num_prompts * n} sequences, more than this server takes "
                f"at once ({most}: --max-num-seqs plus --max-waiting): send fewer prompts per request"
            )

    async def _tokenize(self, request: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt; a truncated prompt's text is that of the tokens it keeps."""
        tokenizer = self.ctx.tokenizer
        keep = request.kept_prompt_tokens(self.ctx.engine.max_model_len)
        results = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError("prompt must not be empty")
                ids = await self.ctx.encode(prompt, request.add_special_tokens, keep)
                if keep is None:
                    results.append((prompt, ids))
                    continue
            else:
                ids = list(prompt) if keep is None else list(prompt[-keep:])
                self.ctx.check_prompt_length(len(ids))
                if any(not 0 <= t < len(tokenizer) for t in ids):
                    raise ValueError(f"prompt token ids must be between 0 and {len(tokenizer) - 1}")
            results.append((await self.ctx.engine.run_in_executor(tokenizer.decode, ids), ids))
        return results

    async def _collect(
        self,
        request: CompletionRequest,
        params: SamplingParams,
        merged: AsyncGenerator[tuple[int, RequestOutput], None],
        request_id: str,
        model: str,
    ) -> CompletionResponse:
        finals: dict[int, RequestOutput] = {}
        async for index, output in merged:
            finals[index] = output
        choices, num_prompt, num_generated, num_cached = [], 0, 0, 0
        for prompt_index in sorted(finals):
            final = finals[prompt_index]
            num_prompt += len(final.prompt_token_ids)
            num_cached += final.num_cached_tokens
            for out in sorted(final.outputs, key=lambda o: o.index):
                out = generated(request, out)
                num_generated += len(out.token_ids)
                choices.append(self._choice(request, params, final, out, prompt_index * params.n + out.index))
        usage = self.ctx.usage(num_prompt, num_generated, num_cached)
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    def _choice(
        self,
        request: CompletionRequest,
        params: SamplingParams,
        final: RequestOutput,
        out: CompletionOutput,
        index: int,
    ) -> CompletionResponseChoice:
        prompt_text = final.prompt or ""
        text = prompt_text + out.text if request.echo else out.text
        logprobs = None
        if request.logprobs is not None:
            token_ids = list(out.token_ids)
            steps: list[dict[int, Logprob] | None] = list(out.logprobs or [])
            if request.echo:
                token_ids, steps = with_prompt(final, token_ids, steps)
            logprobs = self._logprobs(
                token_ids, steps, request.logprobs, as_ids=self.ctx.tokens_as_ids(request)
            )
        return CompletionResponseChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs)
            if params.prompt_logprobs is not None
            else None,
        )

    def _logprobs(
        self,
        token_ids: list[int],
        steps: Sequence[dict[int, Logprob] | None],
        num_top: int,
        offset: int = 0,
        as_ids: bool = False,
    ) -> CompletionLogProbs:
        result = CompletionLogProbs()
        for token_id, step in zip(token_ids, steps, strict=False):
            chosen = step.get(token_id) if step else None
            token = decoded_token(self.ctx.tokenizer, token_id, chosen, as_ids)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if step is None or chosen is None:
                # The first echoed prompt token has no logprob. OpenAI's API sends null, which its own
                # SDK's types reject (strict validation); 0.0 treats the given token as certain.
                result.token_logprobs.append(0.0)
                result.top_logprobs.append({token: 0.0})
                continue
            result.token_logprobs.append(clamp_logprob(chosen.logprob))
            top = {
                decoded_token(self.ctx.tokenizer, tid, lp, as_ids): clamp_logprob(lp.logprob)
                for tid, lp in top_entries(step, num_top)
            }
            top.setdefault(token, clamp_logprob(chosen.logprob))
            result.top_logprobs.append(top)
        return result

    async def _stream(
        self,
        request: CompletionRequest,
        params: SamplingParams,
        merged: AsyncGenerator[tuple[int, RequestOutput], None],
        request_id: str,
        model: str,
        num_prompts: int,
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())
        usage, num_cached = UsageInfo(), 0
        as_ids = self.ctx.tokens_as_ids(request)
        echoed: set[int] = set()
        # Per choice: where its next logprob token starts in its text. Counted over the tokens, not the
        # text sent so far, which lags while text is held back (a possible stop string).
        offsets: dict[int, int] = {}
        try:
            async for prompt_index, output in merged:
                if prompt_index not in echoed:
                    echoed.add(prompt_index)
                    usage.prompt_tokens += len(output.prompt_token_ids)
                    num_cached += output.num_cached_tokens
                for out in (generated(request, o) for o in output.outputs):
                    index = prompt_index * params.n + out.index
                    text, logprobs = out.text, None
                    token_ids = list(out.token_ids)
                    steps: list[dict[int, Logprob] | None] = list(out.logprobs or [])
                    if request.echo and index not in offsets:  # the first chunk carries the prompt
                        text = (output.prompt or "") + text
                        token_ids, steps = with_prompt(output, token_ids, steps)
                    offset = offsets.get(index, 0)
                    if request.logprobs is not None:
                        logprobs = self._logprobs(token_ids, steps, request.logprobs, offset, as_ids)
                        offset += sum(map(len, logprobs.tokens))
                    offsets[index] = offset
                    usage.completion_tokens += len(out.token_ids)
                    choice = CompletionResponseChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                    )
                    chunk = _chunk(request_id, created, model, [choice])
                    if _continuous_usage(request):
                        totals = self.ctx.usage(usage.prompt_tokens, usage.completion_tokens, num_cached)
                        chunk["usage"] = totals.model_dump()
                    yield sse(chunk)
        finally:
            await merged.aclose()
        if self.ctx.streams_usage(request):
            totals = self.ctx.usage(usage.prompt_tokens, usage.completion_tokens, num_cached)
            yield sse(_chunk(request_id, created, model, [], usage=totals))


def generated(request: CompletionRequest, out: CompletionOutput) -> CompletionOutput:
    """What the request gets of an output: for a prompt-scoring request, no generated token."""
    if not request.scores_prompt_only:
        return out
    return dataclasses.replace(out, text="", token_ids=[], logprobs=None, finish_reason="length")


def with_prompt(
    output: RequestOutput, token_ids: list[int], steps: list[dict[int, Logprob] | None]
) -> tuple[list[int], list[dict[int, Logprob] | None]]:
    """The prompt's tokens and logprob steps ahead of the generated ones (echo)."""
    prompt_steps = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return list(output.prompt_token_ids) + token_ids, list(prompt_steps) + steps


def _continuous_usage(request: CompletionRequest) -> bool:
    return request.stream_options is not None and request.stream_options.continuous_usage_stats


def _chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[CompletionResponseChoice],
    usage: UsageInfo | None = None,
) -> dict[str, Any]:
    body = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
    return body.model_dump(mode="json")
