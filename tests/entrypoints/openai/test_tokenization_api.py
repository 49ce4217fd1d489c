"""/tokenize, /detokenize, /tokenizer_info, /v1/models, /version and /metrics on a live server."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow


def test_tokenize_detokenize_round_trip(server) -> None:
    with server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert set(tokens) == {"tokens", "count", "max_model_len"}
        assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 2048
        assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}

        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}]}).json()
        assert chat["count"] > tokens["count"]  # the chat template adds role markers
        strs = http.post("/tokenize", json={"prompt": "Hello", "return_token_strs": True}).json()
        assert len(strs["token_strs"]) == strs["count"]

        info = http.get("/tokenizer_info").json()
        assert info["model_max_length"] == 2048 and info["vocab_size"] > 0 and info["chat_template"]


def test_models_version_and_metrics(server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smol", "smol-alias"]
    assert server.client().models.retrieve("smol-alias").id == "smol-alias"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")
    with server.http() as http:
        assert http.get("/version").json()["version"]
        # One request, so that the latency histograms have samples (and buckets) whatever ran before.
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "tokenmill:num_free_blocks",
        "tokenmill:num_total_blocks",
    ):
        assert name in metrics.text, name
    assert "_created" not in metrics.text  # as vLLM: no creation-time series


def test_start_up_prints_the_kv_cache_size(server) -> None:
    # The engine core is a spawned process: its start-up figures must reach the server's output too.
    log = server.log.read_text()
    assert "KV cache:" in log and "blocks of 16 tokens" in log
