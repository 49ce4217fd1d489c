"""Every bad request gets its 4xx with OpenAI's error body, and the server stays healthy after it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("negative temperature", CHAT, {"messages": HI, "temperature": -1}, 400),
    ("top_p above 1", COMPLETIONS, {"prompt": "a", "top_p": 1.5}, 400),
    ("n of 0", CHAT, {"messages": HI, "n": 0}, 400),
    ("too many logprobs", COMPLETIONS, {"prompt": "a", "logprobs": 50}, 400),
    ("too many top_logprobs", CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 30}, 400),
    ("top_logprobs without logprobs", CHAT, {"messages": HI, "top_logprobs": 2}, 400),
    ("over max_model_len", COMPLETIONS, {"prompt": "a", "max_tokens": 5000}, 400),
    ("prompt over max_model_len", COMPLETIONS, {"prompt": "word " * 2100, "max_tokens": 1}, 400),
    ("token ids over max_model_len", COMPLETIONS, {"prompt": [42] * 3000, "max_tokens": 1}, 400),
    ("max_tokens 0", CHAT, {"messages": HI, "max_tokens": 0}, 400),
    ("missing messages", CHAT, {}, 400),
    ("empty messages", CHAT, {"messages": []}, 400),
    ("messages of the wrong type", CHAT, {"messages": "hi"}, 400),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("json response format", CHAT, {"messages": HI, "response_format": {"type": "json_object"}}, 400),
    ("tools (no tool-call parser)", CHAT, {"messages": HI, "tools": [TOOL]}, 400),
    ("tools, tool_choice required", CHAT, {"messages": HI, "tools": [TOOL], "tool_choice": "required"}, 400),
    (
        "tokenize continuing a message after a generation prompt",
        "/tokenize",
        {"messages": HI, "continue_final_message": True},
        400,
    ),
    ("suffix", COMPLETIONS, {"prompt": "a", "suffix": "b"}, 400),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400),
    ("token id outside the vocab", COMPLETIONS, {"prompt": [10**9]}, 400),
    ("bad logit_bias key", COMPLETIONS, {"prompt": "a", "logit_bias": {"x": 1}}, 400),
    ("stream_options without stream", CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, 400),
    ("unknown model", CHAT, {"model": "gpt-4", "messages": HI}, 404),
    ("unknown model, completions", COMPLETIONS, {"model": "nope", "prompt": "a"}, 404),
    ("streamed bad request", CHAT, {"messages": HI, "stream": True, "max_tokens": 5000}, 400),
    ("bad detokenize ids", "/detokenize", {"tokens": [-1]}, 400),
    ("tokenize without input", "/tokenize", {}, 400),
    ("seed past 64 bits", COMPLETIONS, {"prompt": "a", "max_tokens": 1, "seed": 2**64}, 400),
    ("seed below 64 bits", CHAT, {"messages": HI, "max_tokens": 1, "seed": -(2**63) - 1}, 400),
    ("n past the server's capacity", COMPLETIONS, {"prompt": "a", "max_tokens": 1, "n": 100000}, 400),
    # A request's template is inline Jinja only: a path would render a server file into the prompt.
    ("chat_template naming a file", CHAT, {"messages": HI, "chat_template": "/etc/hostname"}, 400),
]


def assert_error_body(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(
    ("path", "body", "status"), [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request(server, path: str, body: dict[str, Any], status: int) -> None:
    with server.http() as http:
        assert_error_body(http.post(path, json=body), status)
        assert http.get("/health").status_code == 200


def test_malformed_json_content_type_and_routes(server) -> None:
    with server.http() as http:
        assert_error_body(
            http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400
        )
        assert_error_body(
            http.post(CHAT, content=b'{"messages": []}', headers={"content-type": "text/plain"}), 400
        )
        assert_error_body(
            http.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400
        )
        assert_error_body(http.get("/v1/nothing-here"), 404)
        assert_error_body(http.get(CHAT), 405)
        assert http.get("/health").status_code == 200


def test_api_key(server) -> None:
    with server.http(authorized=False) as http:
        assert_error_body(http.post(CHAT, json={"messages": HI}), 401)
        assert_error_body(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        for open_path in ("/health", "/metrics", "/version"):
            assert http.get(open_path).status_code == 200


def test_a_bad_sampling_value_names_its_param(server) -> None:
    with server.http() as http:
        reply = http.post(COMPLETIONS, json={"prompt": "a", "min_tokens": 3, "max_tokens": 2})
        assert_error_body(reply, 400)
        assert reply.json()["error"]["param"] == "min_tokens"
        # Named as the request named them, not as the engine's parameters are.
        body = {"messages": HI, "logprobs": True, "top_logprobs": 21}
        reply = http.post(CHAT, json=body)
        assert reply.json()["error"]["param"] == "top_logprobs"
        assert reply.json()["error"]["message"].startswith("top_logprobs ")
        reply = http.post(CHAT, json={"messages": HI, "max_completion_tokens": 0})
        assert reply.json()["error"]["param"] == "max_completion_tokens"
        reply = http.post(CHAT, json={"messages": HI, "tools": [TOOL]})
        assert reply.json()["error"]["param"] == "tools"
        # tool_choice "none": no tool is called, the request is served as plain chat.
        body = {"messages": HI, "tools": [TOOL], "tool_choice": "none", "max_tokens": 2}
        assert http.post(CHAT, json=body).status_code == 200


def test_serves_after_errors(server) -> None:
    with server.http() as http:
        for _ in range(3):
            assert_error_body(http.post(COMPLETIONS, json={"prompt": "a", "max_tokens": -3}), 400)
        reply = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]


def test_the_largest_seeds_serve(server) -> None:
    # n children get seed, seed + 1, ...: past 2**64 - 1 they wrap, never reaching the engine out of range.
    with server.http() as http:
        for seed in (2**64 - 1, -(2**63)):
            body = {"prompt": "Hello", "max_tokens": 2, "n": 2, "seed": seed, "temperature": 1.0}
            reply = http.post(COMPLETIONS, json=body)
            assert reply.status_code == 200, reply.text
        assert http.get("/health").status_code == 200


def test_a_body_over_the_size_limit_is_a_413_read_no_further(server) -> None:
    # The server's limit is the default 16 MiB: declared by Content-Length, or counted as it arrives.
    client = server.client()
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="smol", prompt="word " * (4 << 20), max_tokens=1)
    assert refused.value.status_code == 413 and "--max-request-body-size" in refused.value.message

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"x" * (1 << 20)

    with server.http() as http:
        reply = http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
        assert_error_body(reply, 413)
        assert http.get("/health").status_code == 200
    assert client.completions.create(model="smol", prompt="Hello", max_tokens=2).choices[0].text


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/tokenize"])
def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server, path: str) -> None:
    # 2 MB of text: more than max_model_len (2048) x the longest token's bytes, so no count is needed.
    text = "word " * 400_000
    body = {"messages": [{"role": "user", "content": text}]} if path == CHAT else {"prompt": text}
    with server.http() as http:
        reply = http.post(path, json={**body, "max_tokens": 1})
        assert_error_body(reply, 400)
        assert "bytes, more than this model's maximum context length of 2048 tokens" in reply.text
        assert http.get("/health").status_code == 200


def test_a_client_gone_before_its_body_arrived_is_no_internal_error(server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    before = server.log.read_text(errors="replace").count("unexpected error serving")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer test-key\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"prompt":')
    with server.http() as http:
        for _ in range(50):  # the server notices the hang-up asynchronously
            time.sleep(0.1)
            assert http.get("/health").status_code == 200
    assert server.log.read_text(errors="replace").count("unexpected error serving") == before
