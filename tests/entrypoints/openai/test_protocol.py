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


def test_null_means_not_given_where_a_field_cannot_be_null() -> None:
    """Clients that send every unset field as null get the defaults, as from vLLM."""
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None}
    chat = ChatCompletionRequest.model_validate({"messages": HI, **nulls, "logprobs": None})
    params = chat.to_sampling_params({})
    assert (params.n, params.presence_penalty, params.logprobs) == (1, 0.0, None)
    assert not chat.stream
    completion = CompletionRequest.model_validate({"prompt": "a", "echo": None, **nulls})
    assert completion.echo is False and completion.max_tokens == 16
    # A field that can be null keeps it: a completion's max_tokens null is no limit.
    unlimited = CompletionRequest.model_validate({"prompt": "a", "max_tokens": None})
    assert unlimited.to_sampling_params({}).max_tokens is None
    with pytest.raises(ValueError, match="messages"):  # a required field is still required
        ChatCompletionRequest.model_validate({"messages": None})


def test_stream_options_ask_for_usage_unless_told_not_to() -> None:
    def include_usage(options: dict[str, object]) -> bool:
        request = ChatCompletionRequest.model_validate(
            {"messages": HI, "stream": True, "stream_options": options}
        )
        assert request.stream_options is not None
        return request.stream_options.include_usage

    assert include_usage({}) and not include_usage({"include_usage": False})


def test_top_logprobs_zero_needs_no_logprobs() -> None:
    for logprobs in (False, None):
        body = {"messages": HI, "top_logprobs": 0, "logprobs": logprobs}
        assert ChatCompletionRequest.model_validate(body).to_sampling_params({}).logprobs is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("guided_choice", ["yes", "no"]),
        ("guided_json", {"type": "object"}),
        ("structured_outputs", {"regex": "a+"}),
        ("use_beam_search", True),
    ],
)
def test_vllm_extras_this_server_lacks_are_refused_not_ignored(field: str, value: object) -> None:
    for request in (
        ChatCompletionRequest.model_validate({"messages": HI, field: value}),
        CompletionRequest.model_validate({"prompt": "a", field: value}),
    ):
        with pytest.raises(InvalidParameterError, match="not supported") as refused:
            request.to_sampling_params({})
        assert refused.value.param == field
    # Their unset values, and vendor extras this server has never heard of, pass.
    unset = {"use_beam_search": False, "guided_json": None, "logits_processors": [], "my_vendor_field": 1}
    ChatCompletionRequest.model_validate({"messages": HI, **unset}).to_sampling_params({})


def test_completions_refuse_a_response_format_too() -> None:
    request = CompletionRequest.model_validate({"prompt": "a", "response_format": {"type": "json_object"}})
    with pytest.raises(InvalidParameterError, match="not supported yet") as refused:
        request.to_sampling_params({})
    assert refused.value.param == "response_format"
    CompletionRequest.model_validate({"prompt": "a", "response_format": {"type": "text"}}).to_sampling_params(
        {}
    )


def test_allowed_token_ids_reach_the_sampling_params() -> None:
    chat = ChatCompletionRequest.model_validate({"messages": HI, "allowed_token_ids": [3, 5]})
    assert chat.to_sampling_params({}).allowed_token_ids == [3, 5]
    with pytest.raises(InvalidParameterError, match="at least one"):
        CompletionRequest.model_validate({"prompt": "a", "allowed_token_ids": []}).to_sampling_params({})
