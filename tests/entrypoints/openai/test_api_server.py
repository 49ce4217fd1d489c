"""The whole app in-process over a fake engine core: reasoning split, health while loading and after the
core dies, 503s, CORS and auth; no model forward passes, so these run in seconds."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tokenmill.engine.core_client import CoreFailed, CoreMessage, CoreOutputs, CoreReady
from tokenmill.engine.outputs import EngineCoreOutput, FinishReason
from tokenmill.entrypoints.cli_args import parse_serve_args
from tokenmill.entrypoints.openai.api_server import build_app
from tokenmill.entrypoints.openai.server_state import ServerState
from tokenmill.metrics.stats import SchedulerStats

REPLY = "<think>plan it</think>The answer."
CACHED = 16  # prompt tokens each request finds in the prefix cache
HI = {"messages": [{"role": "user", "content": "hi"}]}


class ScriptedCore:
    """Answers every request with REPLY's tokens, one per message; `ready` gates the load."""

    instances: list[ScriptedCore] = []
    ready = threading.Event()
    token_ids: list[int] = []
    hold = False  # when set, requests get no output until release()

    def __init__(self, config: Any, on_message: Callable[[CoreMessage], None]) -> None:
        self.on_message = on_message
        self.held: list[str] = []
        ScriptedCore.instances.append(self)

    def start(self) -> None:
        def report_ready() -> None:
            ScriptedCore.ready.wait(30)
            self.on_message(CoreReady(max_model_len=512, vocab_size=49152, stats=SchedulerStats()))

        threading.Thread(target=report_ready, daemon=True).start()

    def add_requests(self, requests: list[Any]) -> None:
        for request in requests:
            if self.hold:
                self.held.append(request.request_id)
            else:
                self.answer(request.request_id)

    def answer(self, request_id: str) -> None:
        for i, token_id in enumerate(self.token_ids):
            finish = FinishReason.LENGTH if i == len(self.token_ids) - 1 else None
            output = EngineCoreOutput(request_id, [token_id], finish_reason=finish, num_cached_tokens=CACHED)
            self.on_message(CoreOutputs([output]))

    def release(self) -> None:
        for request_id in self.held:
            self.answer(request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def make_app(smollm2_tokenizer: Any) -> Iterator[Callable[..., TestClient]]:
    """`make_app(*serve_flags)`: the app over a ScriptedCore, with --reasoning-parser, a key and CORS."""
    ScriptedCore.instances.clear()
    ScriptedCore.ready.clear()
    ScriptedCore.hold = False
    ScriptedCore.token_ids = smollm2_tokenizer.encode(REPLY)
    clients: list[TestClient] = []

    def make(*flags: str) -> TestClient:
        argv = ["--reasoning-parser", "deepseek_r1", "--api-key", "k", "--allowed-origins", "*", *flags]
        state = ServerState(parse_serve_args(argv, environ={}), client_factory=ScriptedCore)
        client = TestClient(build_app(state), headers={"Authorization": "Bearer k"})
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def app_client(make_app: Callable[..., TestClient]) -> TestClient:
    return make_app()


def wait_status(client: TestClient, status: int) -> None:
    for _ in range(600):
        if client.get("/health").status_code == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}")


def test_loading_then_ready_then_dead(app_client: TestClient) -> None:
    loading = app_client.get("/health")
    assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
    assert app_client.post("/v1/chat/completions", json=HI).status_code == 503
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    ScriptedCore.instances[0].on_message(CoreFailed("the engine core process exited (exit code -9)"))
    wait_status(app_client, 503)
    response = app_client.post("/v1/chat/completions", json=HI)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "exit code -9" in response.json()["error"]["message"]


@pytest.mark.parametrize("keep_alive", [False, True])
def test_an_engine_death_stops_the_server_unless_it_is_kept_alive(
    make_app: Callable[..., TestClient], keep_alive: bool
) -> None:
    environ = {"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"} if keep_alive else {}
    state = ServerState(parse_serve_args([], environ=environ), client_factory=ScriptedCore)
    state.server = SimpleNamespace(should_exit=False)  # what uvicorn watches
    state.engine_death_grace_s = 0.5
    with TestClient(build_app(state)) as client:
        ScriptedCore.ready.set()
        wait_status(client, 200)
        ScriptedCore.instances[-1].on_message(CoreFailed("the engine core process exited (exit code -9)"))
        wait_status(client, 503)  # first it says why
        assert "exit code -9" in client.get("/health").json()["error"]["message"]
        assert not state.server.should_exit
        time.sleep(1.0)
        assert state.server.should_exit is not keep_alive  # then it stops, unless kept alive
        assert (state.engine_death is None) is keep_alive


def stream_lines(client: TestClient, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        return [line for line in response.iter_lines() if line]


def test_usage_details_and_forced_usage_chunks(make_app: Callable[..., TestClient]) -> None:
    prompt = {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 5}
    default = make_app()
    ScriptedCore.ready.set()
    wait_status(default, 200)
    assert default.post("/v1/chat/completions", json=HI).json()["usage"]["prompt_tokens_details"] is None
    last = json.loads(stream_lines(default, "/v1/chat/completions", HI)[-2].removeprefix("data: "))
    assert last["choices"] and last.get("usage") is None  # no usage chunk: not asked for
    flagged = make_app("--enable-prompt-tokens-details", "--enable-force-include-usage")
    wait_status(flagged, 200)
    for path, body in (("/v1/chat/completions", HI), ("/v1/completions", prompt)):
        usage = flagged.post(path, json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED}
        lines = stream_lines(flagged, path, body)
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
        assert (
            last["usage"]["total_tokens"]
            == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
        )


def test_reasoning_content(app_client: TestClient) -> None:
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    message = app_client.post("/v1/chat/completions", json=HI).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("plan it", "The answer.")

    with app_client.stream("POST", "/v1/chat/completions", json={**HI, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[len("data: ") :])["choices"][0]["delta"] for line in lines[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "plan it"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."


def test_a_requests_chat_template_needs_the_trust_flag(make_app: Callable[..., TestClient]) -> None:
    body = {**HI, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    for flags, status in (((), 400), (("--trust-request-chat-template",), 200)):
        client = make_app(*flags)
        ScriptedCore.ready.set()
        wait_status(client, 200)
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == status, reply.text
        if status == 400:
            assert "--trust-request-chat-template" in reply.json()["error"]["message"]


def test_auth_and_cors(app_client: TestClient) -> None:
    assert app_client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert app_client.get("/health", headers={"Authorization": ""}).status_code == 503  # open, still loading
    preflight = app_client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://example.com",
            "Access-Control-Request-Method": "POST",
            "Authorization": "",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] in (
        "*",
        "http://example.com",
    )


def test_any_of_several_api_keys_lets_a_request_in(make_app: Callable[..., TestClient]) -> None:
    """vLLM's `--api-key` takes several keys (one per client, say)."""
    client = make_app("--api-key", "k", "second")
    ScriptedCore.ready.set()
    wait_status(client, 200)
    for key, status in (("k", 200), ("second", 200), ("secon", 401), ("k second", 401)):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status


def test_the_api_description_is_served_without_the_key_unless_disabled(
    make_app: Callable[..., TestClient],
) -> None:
    client = make_app()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    chat_request = schema["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert {"messages", "max_tokens", "stream", "top_k"} <= set(chat_request["properties"])
    assert "/ping" in schema["paths"] and "/v1/completions" in schema["paths"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema))
    assert refs and set(refs) <= set(schema["components"]["schemas"])  # every nested model resolves
    assert client.get("/v1/models", headers={"Authorization": ""}).status_code == 401
    hidden = make_app("--disable-fastapi-docs")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert hidden.get(path).status_code == 404, path


def test_full_queue_is_503_with_retry_after(make_app: Callable[..., TestClient]) -> None:
    client = make_app("--max-num-seqs", "1", "--max-waiting", "0")
    ScriptedCore.ready.set()
    wait_status(client, 200)
    ScriptedCore.hold = True
    first: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: first.update(response=client.post("/v1/chat/completions", json=HI))
    )
    thread.start()
    core = ScriptedCore.instances[0]
    for _ in range(600):
        if core.held:
            break
        time.sleep(0.05)
    refused = client.post("/v1/chat/completions", json=HI)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "server_overloaded"
    core.release()
    thread.join(30)
    assert first["response"].status_code == 200
    assert client.get("/health").status_code == 200


def test_a_stream_cut_by_the_engines_death_ends_with_the_same_error_body(app_client: TestClient) -> None:
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    ScriptedCore.hold = True
    core = ScriptedCore.instances[0]

    def first_token_then_death() -> None:
        while not core.held:
            time.sleep(0.01)
        core.on_message(CoreOutputs([EngineCoreOutput(core.held[0], [ScriptedCore.token_ids[0]])]))
        time.sleep(0.3)
        core.on_message(CoreFailed("the engine core process exited (exit code -9)"))

    threading.Thread(target=first_token_then_death, daemon=True).start()
    with app_client.stream("POST", "/v1/chat/completions", json={**HI, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])["error"]
    unstreamed = app_client.post("/v1/chat/completions", json=HI).json()["error"]
    assert error["code"] == unstreamed["code"] == "engine_unavailable" and "exit code -9" in error["message"]


def test_a_default_max_tokens_shrinks_to_the_room_the_prompt_leaves(
    make_app: Callable[..., TestClient], tmp_path: Path
) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 500}))
    client = make_app("--generation-config", str(tmp_path))
    ScriptedCore.ready.set()
    wait_status(client, 200)
    long_chat = {"messages": [{"role": "user", "content": "word " * 200}]}  # ~200 of the 512 tokens
    assert client.post("/v1/chat/completions", json=long_chat).status_code == 200  # 500 did not fit
    explicit = client.post("/v1/chat/completions", json={**long_chat, "max_tokens": 500})
    assert (
        explicit.status_code == 400 and "maximum context length is 512" in explicit.json()["error"]["message"]
    )
    completion = {"prompt": "word " * 200, "max_tokens": None}
    assert client.post("/v1/completions", json=completion).status_code == 200


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_max_logprobs_is_the_servers_limit_both_ways(make_app: Callable[..., TestClient]) -> None:
    low, high = make_app("--max-logprobs", "5"), make_app("--max-logprobs", "30")
    ScriptedCore.ready.set()
    wait_status(low, 200)
    wait_status(high, 200)
    chat = {**HI, "logprobs": True, "top_logprobs": 6}
    error = error_of(low.post("/v1/chat/completions", json=chat), 400)
    assert error["param"] == "top_logprobs" and "between 0 and 5" in error["message"]
    error = error_of(low.post("/v1/completions", json={"prompt": "a", "prompt_logprobs": 6}), 400)
    assert error["param"] == "prompt_logprobs"
    # Past the default 20, up to the server's 30: accepted (it was refused at 20 whatever the flag).
    assert (
        high.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "logprobs": 25}).status_code == 200
    )
    error = error_of(high.post("/v1/completions", json={"prompt": "a", "logprobs": 31}), 400)
    assert "between 0 and 30" in error["message"]


def test_more_prompts_than_the_server_ever_holds_are_refused_before_tokenizing(
    make_app: Callable[..., TestClient],
) -> None:
    client = make_app("--max-num-seqs", "2", "--max-waiting", "1")
    ScriptedCore.ready.set()
    wait_status(client, 200)
    error = error_of(client.post("/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 1}), 400)
    assert "4 prompts x n=1 are 4 sequences" in error["message"] and "fewer prompts" in error["message"]
    error_of(client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1}), 400)
    assert client.post("/v1/completions", json={"prompt": ["a"] * 3, "max_tokens": 1}).status_code == 200


def test_request_body_faults_are_400s_or_415(app_client: TestClient) -> None:
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    json_type = {"content-type": "application/json"}
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    huge_int = b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}"
    for body in (deep, huge_int):
        assert (
            "malformed JSON"
            in error_of(app_client.post("/v1/completions", content=body, headers=json_type), 400)["message"]
        )
    gzipped = app_client.post(
        "/v1/completions", content=b"\x1f\x8b", headers={**json_type, "content-encoding": "gzip"}
    )
    assert "content encoding" in error_of(gzipped, 415)["message"]
    # A big body is parsed off the event loop; it still gets its validation error.
    big = b'{"prompt": "' + b"a " * 200_000 + b'", "n": 0}'
    assert error_of(app_client.post("/v1/completions", content=big, headers=json_type), 400)["param"] == "n"
    assert app_client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "a", "repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_values_the_engine_cannot_serve_are_refused_by_name(
    app_client: TestClient, body: dict[str, Any], param: str
) -> None:
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    assert error_of(app_client.post("/v1/completions", json=body), 400)["param"] == param


def test_input_text_parts_and_ping(app_client: TestClient) -> None:
    ScriptedCore.ready.set()
    wait_status(app_client, 200)
    parts = [{"type": "input_text", "text": "hi"}, {"type": "text", "text": "there"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    assert app_client.post("/v1/chat/completions", json=body).status_code == 200
    body = {"messages": [{"role": "user", "content": [{"type": "text"}]}]}
    error = error_of(app_client.post("/v1/chat/completions", json=body), 400)
    assert "needs its text" in error["message"]
    assert app_client.get("/ping").status_code == 200 and app_client.post("/ping").status_code == 200
