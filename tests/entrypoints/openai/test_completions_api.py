"""/v1/completions through the real openai SDK against a live server."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


def test_n_stop_and_logprobs(server) -> None:
    client = server.client()
    reply = client.completions.create(
        model="smol", prompt=PROMPT, n=2, max_tokens=4, temperature=0, logprobs=3
    )
    assert reply.object == "text_completion" and sorted(c.index for c in reply.choices) == [0, 1]
    first = reply.choices[0]
    assert first.text == reply.choices[1].text  # greedy
    assert first.logprobs is not None and first.logprobs.tokens is not None
    assert "".join(first.logprobs.tokens) == first.text
    assert first.logprobs.token_logprobs is not None and first.logprobs.top_logprobs is not None
    assert all(len(top) >= 3 for top in first.logprobs.top_logprobs)
    assert first.logprobs.text_offset == sorted(first.logprobs.text_offset)

    stop = first.text.strip().split()[-1]
    stopped = client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert first.text.startswith(stopped.choices[0].text)

    # All of them in one request, through the strict client: echoed tokens carry logprobs too.
    combined = client.completions.create(
        model="smol", prompt=PROMPT, n=2, stop=["."], logprobs=2, echo=True, max_tokens=5, temperature=0
    )
    for choice in combined.choices:
        assert choice.text.startswith(PROMPT) and choice.logprobs is not None
        assert "".join(choice.logprobs.tokens or []) == choice.text


def test_echo_and_prompt_forms(server) -> None:
    client = server.client()
    echoed = client.completions.create(model="smol", prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and len(echoed.choices[0].text) > len(PROMPT)

    with server.http() as http:
        token_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    many = client.completions.create(
        model="smol",
        prompt=[PROMPT, "The sky is"],
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    by_ids = client.completions.create(
        model="smol", prompt=[token_ids, token_ids[:2]], max_tokens=2, temperature=0
    )
    single_ids = client.completions.create(model="smol", prompt=token_ids, max_tokens=2, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and [c.index for c in by_ids.choices] == [0, 1]
    assert echoed.choices[0].text == PROMPT + many.choices[0].text
    assert by_ids.choices[0].text == many.choices[0].text == single_ids.choices[0].text
    assert many.usage is not None and many.usage.completion_tokens == 4


def test_stream_equals_non_stream_and_echo_logprobs(server) -> None:
    # The SDK types a completion chunk's finish_reason as required, so streamed completions (whose
    # chunks carry null until the last, as OpenAI's and vLLM's do) need the non-strict client.
    client = server.client(strict=False)
    full = client.completions.create(model="smol", prompt=PROMPT, max_tokens=5, temperature=0)
    chunks = list(
        client.completions.create(
            model="smol",
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage

    echoed = client.completions.create(
        model="smol",
        prompt=PROMPT,
        max_tokens=1,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body={"prompt_logprobs": 1},
    )
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs[0] == 0.0  # the first prompt token has no logprob: given, certain
    assert all(value is not None and value <= 0.0 for value in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == echoed.choices[0].text
    prompt_logprobs = (echoed.choices[0].model_extra or {})["prompt_logprobs"]  # vLLM's extra field
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(logprobs.tokens) - 1
    assert all("logprob" in entry for step in prompt_logprobs[1:] for entry in step.values())


def test_streamed_echo_with_logprobs_equals_the_whole_answer(server) -> None:
    client = server.client(strict=False)
    args = {"model": "smol", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
    full = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    assert full.logprobs is not None
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens or []] == full.logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset or []] == full.logprobs.text_offset
    assert [v for lp in streamed for v in lp.token_logprobs or []] == full.logprobs.token_logprobs


def test_echo_with_max_tokens_0_scores_the_prompt(server) -> None:
    client = server.client(strict=False)
    args = {"model": "smol", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    scored = client.completions.create(**args)
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs is not None and "".join(choice.logprobs.tokens or []) == PROMPT
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    streamed = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.text for c in streamed) == PROMPT
    assert [t for c in streamed for t in (c.logprobs.tokens if c.logprobs else [])] == choice.logprobs.tokens
    with server.http() as http:  # without echo there is nothing to return: still refused
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}).status_code == 400


def test_streamed_logprobs_with_held_back_text_match_the_whole_answer(server) -> None:
    # A stop string that never matches still holds text back while it might: offsets must not lag.
    client = server.client(strict=False)
    args = {"model": "smol", "prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    args["stop"] = ["zzzzzz"]
    full = client.completions.create(**args).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True) if c.choices]
    assert full is not None
    assert [o for lp in chunks if lp for o in lp.text_offset or []] == full.text_offset


def test_allowed_token_ids_limit_what_is_generated(server) -> None:
    """vLLM's extra: only these tokens can be sampled (a classifier's labels, say)."""
    client = server.client()
    with server.http() as http:
        allowed = http.post("/tokenize", json={"prompt": " yes no maybe"}).json()["tokens"]
        texts = {http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in allowed}
    for temperature in (0, 1.0):
        reply = client.completions.create(
            model="smol",
            prompt=PROMPT,
            max_tokens=6,
            temperature=temperature,
            logprobs=0,
            extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
        )
        logprobs = reply.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens and set(logprobs.tokens) <= texts, logprobs.tokens
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(
            model="smol", prompt=PROMPT, max_tokens=2, extra_body={"allowed_token_ids": [10**9]}
        )


def test_tokens_as_token_ids_in_logprobs(server) -> None:
    client = server.client()
    extra = {"return_tokens_as_token_ids": True}
    plain = client.completions.create(model="smol", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    named = client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, extra_body=extra
    )
    assert named.choices[0].text == plain.choices[0].text
    tokens = named.choices[0].logprobs.tokens if named.choices[0].logprobs else None
    assert tokens and all(t.startswith("token_id:") for t in tokens)
    with server.http() as http:
        ids = [int(t.removeprefix("token_id:")) for t in tokens]
        assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == plain.choices[0].text
    chat = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body=extra,
    )
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content and all(e.token.startswith("token_id:") for e in content)
    assert all(top.token.startswith("token_id:") for e in content for top in e.top_logprobs)


def test_truncate_prompt_tokens_keeps_the_prompts_end(server) -> None:
    client = server.client()
    with server.http() as http:
        ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        kept_text = http.post("/detokenize", json={"tokens": ids[-3:]}).json()["prompt"]
    for prompt in (PROMPT, ids):
        reply = client.completions.create(
            model="smol",
            prompt=prompt,
            max_tokens=1,
            echo=True,
            extra_body={"truncate_prompt_tokens": 3},
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == 3
        assert reply.choices[0].text.startswith(kept_text)
    chat = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=1,
        extra_body={"truncate_prompt_tokens": 5},
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        client.completions.create(
            model="smol", prompt=PROMPT, max_tokens=1, extra_body={"truncate_prompt_tokens": 0}
        )


def test_bad_words_are_never_generated(server) -> None:
    client = server.client()
    plain = client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=0)
    word = plain.choices[0].text.split()[1]  # a word greedy decoding writes, after a space
    banned = client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"bad_words": [word]}
    )
    assert word in plain.choices[0].text.split() and word not in banned.choices[0].text.split()
    with pytest.raises(openai.BadRequestError, match="bad_words"):
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=2, extra_body={"bad_words": [" "]})
