"""Every request and response model of the OpenAI-compatible API, with vLLM's extra sampling fields.

Requests accept unknown fields (clients send vendor extras), except vLLM's extras for features this server
lacks (`UNSUPPORTED_VLLM_FIELDS`), and take an explicit null as "not given" (`RequestModel`).
`to_sampling_params()` turns a request into `SamplingParams`, raising ValueError (mapped to 400) for values
the engine cannot honour.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.content_parts import TEXT_PART_TYPES
from tokenmill.sampling_params import (
    MAX_TOP_LOGPROBS,
    InvalidParameterError,
    RequestOutputKind,
    SamplingParams,
)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestModel(OpenAIBaseModel):
    """A request body, where an explicit null means "not given" for fields that cannot be null (`"n": null`
    is n's default), as in vLLM, whose fields are Optional: many clients send every unset field as null.
    Fields that can be null keep it (a completion's `"max_tokens": null` is no limit)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or cls._may_be_null(key)}

    @classmethod
    def _may_be_null(cls, name: str) -> bool:
        field = cls.model_fields.get(name)
        return field is None or field.is_required() or type(None) in get_args(field.annotation)


# --- errors and models -----------------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- shared request fields ---------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = True  # as in vLLM: `stream_options: {}` asks for the usage chunk
    continuous_usage_stats: bool = False


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]


UNSUPPORTED_VLLM_FIELDS: dict[str, Any] = {
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "structured_outputs": None,
    "logits_processors": None,
    "use_beam_search": False,
}
"""vLLM's request extras this server does not implement, with their unset values: any other value is
refused with a 400, not ignored (the answer would silently not be what was asked for)."""


class SamplingFields(RequestModel):
    """The sampling fields completions and chat share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool = False  # logprobs name tokens `token_id:N` (vLLM's)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens; -1: the context's worth
    response_format: ResponseFormat | None = None

    def _build_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict[str, Any], max_logprobs: int
    ) -> SamplingParams:
        self._refuse_unsupported()
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidParameterError(
                "prompt_logprobs", "is not available when stream is true (as in vLLM)"
            )
        params = self._sampling_params(max_tokens, logprobs, defaults)
        params.validate(max_logprobs)  # the server's --max-logprobs, not the default 20
        return params

    def kept_prompt_tokens(self, max_model_len: int) -> int | None:
        """How many of the prompt's last tokens truncate_prompt_tokens keeps; None: all of them."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return None
        if keep == -1:
            return max_model_len
        if keep < 1:
            raise InvalidParameterError("truncate_prompt_tokens", f"must be -1 or at least 1, got {keep}")
        return keep

    def _refuse_unsupported(self) -> None:
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidParameterError(
                "response_format", f"{self.response_format.type!r} is not supported yet; use 'text'"
            )
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_VLLM_FIELDS and value not in (UNSUPPORTED_VLLM_FIELDS[name], None, []):
                raise InvalidParameterError(name, "is not supported by this server yet")

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict[str, Any]
    ) -> SamplingParams:

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n,
            best_of=self.best_of,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=_logit_bias(self.logit_bias),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except ValueError:
        raise InvalidParameterError("logit_bias", "keys must be token ids (integers as strings)") from None


# --- completions -------------------------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list (one or many strings, or one or many token-id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return prompt  # type: ignore[return-value]

    @property
    def scores_prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt back with its logprobs, nothing generated (as vLLM)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(
        self, defaults: dict[str, Any], max_logprobs: int = MAX_TOP_LOGPROBS
    ) -> SamplingParams:
        if self.suffix is not None:
            raise ValueError("suffix is not supported: insert the text in the prompt instead")
        # Scoring runs one step (the engine generates at least one token); its token is dropped.
        max_tokens = 1 if self.scores_prompt_only else self.max_tokens
        params = self._build_params(max_tokens, self.logprobs, defaults, max_logprobs)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs
        return params


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # with --enable-prompt-tokens-details


# vLLM's prompt_logprobs: per prompt token (None for the first), token id -> logprob, rank, decoded token.
PromptLogprobsJSON = list[dict[str, dict[str, Any]] | None]


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsJSON | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# --- chat completions --------------------------------------------------------------------------------


class ContentPart(RequestModel):
    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type not in TEXT_PART_TYPES:
                raise ValueError(f"content parts of type {part.type!r} are not supported; send text parts")
            if part.text is None:
                raise InvalidParameterError(
                    "messages", f"a content part of type {part.type!r} needs its text"
                )
            parts.append(part.text)
        return "\n".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """The request's own limit (max_completion_tokens, else the older max_tokens); None: unset."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_template_flags(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the chat template, content parts joined into text."""
        if not self.messages:
            raise ValueError("messages must not be empty")
        self.check_template_flags()
        conversation = []
        for message in self.messages:
            entry = message.model_dump(exclude_none=True)
            entry["content"] = message.text() or ""
            conversation.append(entry)
        return conversation

    def to_sampling_params(
        self, defaults: dict[str, Any], max_logprobs: int = MAX_TOP_LOGPROBS
    ) -> SamplingParams:
        self.check_template_flags()
        if self.tools and self.tool_choice != "none":
            # vLLM too refuses tool calls unless started with a tool-call parser; a silent plain-text
            # answer would look like a model that chose not to call.
            raise InvalidParameterError(
                "tools", "are not supported by this server yet: send no tools, or tool_choice 'none'"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._build_params(self.requested_max_tokens, logprobs, defaults, max_logprobs)
        except InvalidParameterError as err:
            raise self._in_request_terms(err) from None

    def _in_request_terms(self, err: InvalidParameterError) -> InvalidParameterError:
        """The error named after this request's own field (top_logprobs, max_completion_tokens)."""
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        if err.param not in names:
            return err
        return InvalidParameterError(names[err.param], str(err).removeprefix(f"{err.param} "))


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProb(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProb] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobsJSON | None = None


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# --- tokenization ------------------------------------------------------------------------------------


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
