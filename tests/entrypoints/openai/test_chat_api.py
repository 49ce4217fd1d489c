"""/v1/chat/completions through the real openai SDK (strict response validation) against a live server."""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_matches_stream_and_reports_usage(server) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "smol"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="smol",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == choice.message.content

    # continuous_usage_stats (vLLM's): every chunk carries the usage so far, the prompt from the first.
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with server.http() as http:
        lines = http.post("/v1/chat/completions", json=body).text.splitlines()
    usages = [json.loads(line[6:])["usage"] for line in lines if line.startswith("data: {")]
    assert {u["prompt_tokens"] for u in usages} == {reply.usage.prompt_tokens}
    assert [u["completion_tokens"] for u in usages] == sorted(u["completion_tokens"] for u in usages)


def test_seed_makes_sampling_reproducible(server) -> None:
    client = server.client()

    def sample(seed: int) -> str | None:
        reply = client.chat.completions.create(
            model="smol-alias", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(1234) == sample(1234)


@pytest.mark.parametrize("top_logprobs", [0, 5])
def test_logprobs(server, top_logprobs: int) -> None:
    reply = server.client().chat.completions.create(
        model="smol", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=top_logprobs
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert reply.usage is not None and len(choice.logprobs.content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in choice.logprobs.content) == choice.message.content
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == top_logprobs
        if top_logprobs:  # greedy: the chosen token is the most likely one
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_n_content_parts_roles_and_template_fields(server) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}], "name": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "Hi", "x_extra": {"kept": True}},
    ]
    reply = server.client().chat.completions.create(
        model="smol",
        messages=messages,
        n=2,
        max_completion_tokens=3,
        temperature=0,
        extra_body={
            "add_generation_prompt": False,
            "continue_final_message": True,
            "chat_template_kwargs": {},
        },
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy
    assert reply.usage is not None and reply.usage.completion_tokens <= 6


def test_async_client_streams_concurrently(server) -> None:
    async def run() -> list[str]:
        client = server.async_client()

        async def one(word: str) -> str:
            stream = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": word}],
                max_tokens=4,
                temperature=0,
                stream=True,
                extra_body={
                    "ignore_eos": True,
                    "min_tokens": 4,
                    "top_k": 5,
                    "min_p": 0.0,
                    "repetition_penalty": 1.0,
                },
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(word) for word in ("red", "green", "blue")))
        finally:
            await client.close()

    texts = asyncio.run(run())
    assert len(texts) == 3 and all(texts)


def test_streamed_logprobs_come_for_every_token_even_when_text_is_held_back(server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Reply with three emoji only: 🍕🎉🚀"}]
    args = {"model": "smol", "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True}
    args["stop"] = ["zzzzzzzzzz"]  # never matches, but holds text back while it might
    full = client.chat.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**args, stream=True) if c.choices]
    assert full.logprobs is not None and full.logprobs.content
    streamed = [entry.token for c in chunks if c.logprobs for entry in c.logprobs.content or []]
    assert streamed == [entry.token for entry in full.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == full.message.content
