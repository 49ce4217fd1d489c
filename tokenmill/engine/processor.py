"""Frontend input side: prompt -> token ids, validation against the model's limits, n-way fan-out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypedDict

from tokenmill.engine.outputs import EngineCoreRequest
from tokenmill.sampling_params import MAX_TOP_LOGPROBS, SamplingParams


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str


PromptType = str | list[int] | TokensPrompt


@dataclass
class ProcessedRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    core_requests: list[EngineCoreRequest]  # n children, ids f"{i}_{request_id}"


def child_request_id(index: int, request_id: str) -> str:
    return f"{index}_{request_id}"


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        max_logprobs: int = MAX_TOP_LOGPROBS,
        strict_max_tokens: bool = True,
    ) -> None:
        """`strict_max_tokens`: the prompt plus max_tokens must fit the context (the OpenAI server's rule,
        as vLLM's); else the prompt must leave room for one token and generation ends at the context's
        end with finish_reason "length" (vLLM's offline rule)."""
        self.strict_max_tokens = strict_max_tokens
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_logprobs = max_logprobs

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams) -> ProcessedRequest:
        text, token_ids = self.tokenize(prompt)
        self._validate(token_ids, params)
        max_tokens = params.max_tokens or self.max_model_len - len(token_ids)
        params = dataclasses.replace(
            params,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_token_ids,
            bad_words_token_ids=self._bad_words_token_ids(params.bad_words or []),
        )
        children = [
            EngineCoreRequest(
                child_request_id(i, request_id),
                token_ids,
                self._child_params(params, i),
                group_id=request_id if params.n > 1 else None,
            )
            for i in range(params.n)
        ]
        return ProcessedRequest(text, token_ids, children)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens as it starts a text and after a space (" word" is often one other token),
        as vLLM's; the spaced form only where it differs and has as many tokens."""
        found: list[list[int]] = []
        for word in words:
            alone = list(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            found += [alone] if alone else []
            if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
                found.append(spaced)
        return found

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        # A seeded request with n > 1 must not repeat one completion n times (seeds are 64-bit: wrap).
        seed = None if params.seed is None else (params.seed + index) % 2**64
        return dataclasses.replace(params, n=1, best_of=None, seed=seed)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        params.validate(max_logprobs=self.max_logprobs)
        params.validate_token_ids(self.vocab_size)
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of the vocabulary (0..{self.vocab_size - 1})")
        max_tokens = params.max_tokens if params.max_tokens and self.strict_max_tokens else 1
        if len(token_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                f"needs {len(token_ids) + max_tokens} ({len(token_ids)} in the prompt, {max_tokens} to "
                "generate): shorten the prompt or ask for fewer tokens (max_tokens, max_completion_tokens)"
            )
