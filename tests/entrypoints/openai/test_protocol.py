"""Request models -> SamplingParams: OpenAI's and vLLM's fields, defaults, and the 400-worthy mistakes."""

from __future__ import annotations

import pytest

from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.sampling_params import InvalidParameterError, RequestOutputKind

HI = [{"role": "user", "content": "hi"}]


def test_chat_fields_become_sampling_params() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": HI,
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "logprobs": True,
            "top_logprobs": 3,
            "n": 2,
            "seed": 5,
            "stop": "x",
            "stream": True,
            "ignore_eos": True,
            "min_tokens": 2,
            "top_k": -1,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "stop_token_ids": [7],
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
            "unknown_vendor_field": 1,
        }
    )
    params = request.to_sampling_params({})
    assert (params.max_tokens, params.logprobs, params.n, params.seed) == (7, 3, 2, 5)
    assert params.stop == ["x"] and params.ignore_eos and params.min_tokens == 2 and params.top_k == 0
    assert params.min_p == 0.1 and params.repetition_penalty == 1.1 and params.stop_token_ids == [7]
    assert not params.skip_special_tokens and params.include_stop_str_in_output
    assert params.output_kind is RequestOutputKind.DELTA
    # prompt_logprobs are not streamed (as in vLLM): asked for in a stream, they are refused by name.
    whole = request.model_copy(update={"stream": False, "prompt_logprobs": 1})
    assert whole.to_sampling_params({}).prompt_logprobs == 1
    with pytest.raises(InvalidParameterError) as refused:
        request.model_copy(update={"prompt_logprobs": 1}).to_sampling_params({})
    assert refused.value.param == "prompt_logprobs"


def test_generation_config_defaults_apply_only_when_omitted() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 50}
    params = ChatCompletionRequest.model_validate({"messages": HI, "top_p": 0.5}).to_sampling_params(defaults)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.5, 50)
    assert params.output_kind is RequestOutputKind.FINAL_ONLY
    completion = CompletionRequest.model_validate({"prompt": "a"}).to_sampling_params(defaults)
    assert completion.max_tokens == 16  # the completions API's own default, as OpenAI's


def test_completion_prompt_forms_and_echo_logprobs() -> None:
    def prompts(value: object) -> object:
        return CompletionRequest.model_validate({"prompt": value}).prompts()

    assert prompts("a") == ["a"] and prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]] and prompts([[1], [2, 3]]) == [[1], [2, 3]]
    params = CompletionRequest.model_validate(
        {"prompt": "a", "echo": True, "logprobs": 2}
    ).to_sampling_params({})
    assert params.logprobs == 2 and params.prompt_logprobs == 2


def test_content_parts_are_joined() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "custom",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "n",
                    "extra": 1,
                }
            ]
        }
    )
    assert request.conversation() == [{"role": "custom", "content": "a\nb", "name": "n", "extra": 1}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"response_format": {"type": "json_object"}}, "not supported yet"),
        ({"top_logprobs": 2}, "needs logprobs"),
        ({"continue_final_message": True}, "cannot both be true"),
        ({"temperature": -1}, "temperature"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_mistakes_are_value_errors(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChatCompletionRequest.model_validate({"messages": HI, **body}).to_sampling_params({})


def test_completion_mistakes_are_value_errors() -> None:
    with pytest.raises(ValueError, match="suffix"):
        CompletionRequest.model_validate({"prompt": "a", "suffix": "b"}).to_sampling_params({})
    with pytest.raises(ValueError, match="empty"):
        CompletionRequest.model_validate({"prompt": []}).prompts()
