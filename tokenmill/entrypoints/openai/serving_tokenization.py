"""POST /tokenize, POST /detokenize and GET /tokenizer_info, with vLLM's shapes."""

from __future__ import annotations

from typing import Any

from tokenmill.entrypoints.openai.errors import APIError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.entrypoints.openai.serving_chat import render_chat_prompt
from tokenmill.entrypoints.openai.serving_engine import ServingContext


class OpenAIServingTokenization:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.ctx.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("send exactly one of prompt or messages", 400)
        engine = self.ctx.engine
        try:
            if request.messages is not None:
                chat = ChatCompletionRequest(
                    messages=request.messages,
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message,
                    chat_template_kwargs=request.chat_template_kwargs,
                )
                text = await engine.run_in_executor(render_chat_prompt, self.ctx, chat, chat.conversation())
                add_special = bool(request.add_special_tokens)
            else:
                text = request.prompt or ""
                add_special = request.add_special_tokens is not False
            tokens = await self.ctx.encode(text, add_special)  # refuses a text no context could hold
        except ValueError as err:
            raise APIError.bad_request(err) from None
        token_strs = self.ctx.tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=token_strs
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(request.model)
        vocab_size = len(self.ctx.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(
                f"token id {bad[0]} is out of the vocabulary (0..{vocab_size - 1})", 400, param="tokens"
            )
        prompt = await self.ctx.engine.run_in_executor(self.ctx.tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=prompt)

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.ctx.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "model_max_length": self.ctx.engine.max_model_len,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": self.ctx.chat_template or tokenizer.chat_template,
        }
