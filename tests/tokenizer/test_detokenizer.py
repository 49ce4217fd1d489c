"""Incremental detokenization with SmolLM2's byte-level BPE: split UTF-8, stop strings, streaming deltas."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 😀 世界 là-bas 🇫🇷 👩‍👩‍👧 ok",
    "数学是研究数量、结构以及空间等概念的一门学科。",
    "Ünïcödé ✓ → ∑ 🦀🦀 end",
    " leading space and\nnew lines\n\n  indented",
]


@pytest.fixture
def detok_tokenizer(smollm2_tokenizer: Any) -> Any:
    """SmolLM2's byte-level BPE tokenizer (the session fixture of tests/conftest.py)."""
    return smollm2_tokenizer


def stream(
    tokenizer: Any, token_ids: list[int], params: SamplingParams, prompt: str = "Write:"
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed one token per update as the frontend does; return the deltas it would send."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params)
    deltas, stop = [], None
    for index, token_id in enumerate(token_ids):
        finished = index == len(token_ids) - 1
        stop = detok.update([token_id], finished=finished)
        deltas.append(detok.get_next_output_text(finished or stop is not None, delta=True))
        if stop is not None:
            break
    return detok, deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_the_full_decode(detok_tokenizer: Any, text: str) -> None:
    token_ids = detok_tokenizer.encode(text)
    detok, deltas, _ = stream(detok_tokenizer, token_ids, SamplingParams())
    assert detok.output_text == detok_tokenizer.decode(token_ids, skip_special_tokens=True) == text
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert detok.token_ids == token_ids


def test_characters_split_across_tokens_arrive_whole(detok_tokenizer: Any) -> None:
    token_ids = detok_tokenizer.encode("😀")
    assert len(token_ids) > 1  # a 4-byte character spread over byte-level tokens
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams())
    for token_id in token_ids[:-1]:
        detok.update([token_id])
        assert detok.output_text == ""
    detok.update(token_ids[-1:])
    assert detok.output_text == "😀"


def test_many_tokens_per_update(detok_tokenizer: Any) -> None:
    token_ids = detok_tokenizer.encode(TEXTS[0])
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams())
    for start in range(0, len(token_ids), 3):
        detok.update(token_ids[start : start + 3])
    assert detok.output_text == TEXTS[0]


def test_an_incomplete_character_is_flushed_when_finished(detok_tokenizer: Any) -> None:
    token_ids = detok_tokenizer.encode("ok 😀")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams())
    detok.update(token_ids)
    assert detok.output_text == "ok"
    detok.update([], finished=True)  # nothing new: nothing happens
    assert detok.output_text == "ok"
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams())
    detok.update(token_ids, finished=True)
    assert detok.output_text == detok_tokenizer.decode(token_ids)
    assert detok.output_text.endswith("\ufffd")


def test_the_first_tokens_leading_space_is_kept(detok_tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(detok_tokenizer, detok_tokenizer.encode("Say"), SamplingParams())
    detok.update(detok_tokenizer.encode(" hello world"))
    assert detok.output_text == " hello world"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(detok_tokenizer: Any, skip: bool) -> None:
    token_ids = detok_tokenizer.encode("Hi<|im_end|> there<repo_name>!<|im_start|>")
    assert {2, 3, 1} <= set(token_ids)
    detok, _, _ = stream(detok_tokenizer, token_ids, SamplingParams(skip_special_tokens=skip))
    assert detok.output_text == detok_tokenizer.decode(token_ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detok.output_text) is not skip
    assert ("<repo_name>" in detok.output_text) is not skip


def test_out_of_vocabulary_ids_decode_to_nothing(detok_tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams())
    detok.update(detok_tokenizer.encode("a") + [len(detok_tokenizer) + 10] + detok_tokenizer.encode(" b"))
    assert detok.output_text == "a b"


def tokens_straddling(tokenizer: Any, text: str, stop: str) -> list[int]:
    """`text`'s token ids, checking that `stop` begins and ends inside tokens, not at their boundaries."""
    token_ids = tokenizer.encode(text)
    boundaries = {len(tokenizer.decode(token_ids[:i])) for i in range(len(token_ids) + 1)}
    start = text.index(stop)
    assert start not in boundaries and start + len(stop) not in boundaries
    return token_ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(detok_tokenizer: Any, include: bool) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    token_ids = tokens_straddling(detok_tokenizer, text, "ick bro")
    params = SamplingParams(stop=["nothing here", "ick bro"], include_stop_str_in_output=include)
    detok, deltas, stop = stream(detok_tokenizer, token_ids, params)
    assert stop == "ick bro" and detok.stop_string == "ick bro"
    expected = "The quick bro" if include else "The qu"
    assert detok.output_text == expected
    assert "".join(deltas) == expected
    assert detok.update(detok_tokenizer.encode(" more")) is None  # finished: later tokens are ignored
    assert detok.output_text == expected


def test_streaming_never_sends_a_partial_stop_string(detok_tokenizer: Any) -> None:
    text = "alpha END beta ENDING? no: END_OF_TEXT and more"
    token_ids = detok_tokenizer.encode(text)
    detok, deltas, stop = stream(detok_tokenizer, token_ids, SamplingParams(stop=["END_OF"]))
    assert stop == "END_OF"
    final = "alpha END beta ENDING? no: "
    assert detok.output_text == final
    sent = ""
    for delta in deltas:
        sent += delta
        assert final.startswith(sent)  # nothing sent is ever retracted
    assert sent == final


def test_held_back_text_without_delta(detok_tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams(stop=["xyz!"]))
    detok.update(detok_tokenizer.encode("hello there"))
    assert detok.get_next_output_text(finished=False, delta=False) == "hello th"
    assert detok.get_next_output_text(finished=True, delta=False) == "hello there"
    short = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams(stop=["a long stop"]))
    short.update(detok_tokenizer.encode("hi"))
    assert short.get_next_output_text(finished=False, delta=False) == ""
    assert short.get_next_output_text(finished=False, delta=True) == ""
    assert short.get_next_output_text(finished=True, delta=True) == "hi"


def test_earliest_stop_string_wins(detok_tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams(stop=["world", "lo"]))
    assert detok.update(detok_tokenizer.encode("hello world")) == "lo"
    assert detok.output_text == "hel"


def test_stop_strings_wait_for_min_tokens(detok_tokenizer: Any) -> None:
    token_ids = detok_tokenizer.encode("stop here, then stop again")
    num_before_second = len(detok_tokenizer.encode("stop here, then"))
    params = SamplingParams(stop=["stop"], min_tokens=2)
    detok, _, stop = stream(detok_tokenizer, token_ids, params)
    assert stop == "stop"
    assert detok.output_text == "stop here, then "
    assert len(detok.token_ids) == num_before_second + 1
    at_once = IncrementalDetokenizer(detok_tokenizer, [], params)
    assert at_once.update(token_ids) == "stop"
    assert at_once.output_text == "stop here, then "


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text(detok_tokenizer: Any, include: bool) -> None:
    """The scheduler's stop token (eos or a stop_token_id) ends the output; its text only with include."""
    period = detok_tokenizer.encode(".")[0]
    params = SamplingParams(stop_token_ids=[period], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(detok_tokenizer, [], params)
    detok.update(detok_tokenizer.encode("Done"))
    assert detok.update([period], stop_terminated=True) is None
    assert detok.output_text == ("Done." if include else "Done")
    assert detok.token_ids[-1] == period
    eos = IncrementalDetokenizer(detok_tokenizer, [], SamplingParams(include_stop_str_in_output=include))
    eos.update(detok_tokenizer.encode("Done") + [detok_tokenizer.eos_token_id], stop_terminated=True)
    assert eos.output_text == "Done"  # a special token: skipped either way


class SlowTokenizer:
    """A minimal slow tokenizer with one added token, to show spaces_between_special_tokens."""

    is_fast = False
    all_special_ids = [0]
    added_tokens_decoder: dict[int, Any] = {}
    vocab = ["<s>", "a", "b", "<x>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return {"<s>": 0, "<x>": 3}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@pytest.mark.parametrize(("spaces", "expected"), [(True, "a <x> b"), (False, "a<x>b")])
def test_spaces_between_special_tokens_with_a_slow_tokenizer(spaces: bool, expected: str) -> None:
    params = SamplingParams(spaces_between_special_tokens=spaces)
    detok = IncrementalDetokenizer(SlowTokenizer(), [], params)
    for token_id in [1, 3, 0, 2]:
        detok.update([token_id])
    assert detok.output_text == expected


class SentencePieceLikeTokenizer(SlowTokenizer):
    """Decodes like Llama's tokenizer: "▁" is a space, and a decoded text's leading space is dropped."""

    is_fast = True
    vocab = ["<s>", "▁hello", "▁world", "!"]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace("▁", " ").removeprefix(" ")


def test_prompt_tokens_give_the_first_output_token_its_space() -> None:
    detok = IncrementalDetokenizer(SentencePieceLikeTokenizer(), [0, 1], SamplingParams())
    detok.update([2])
    detok.update([3])
    assert detok.output_text == " world!"
