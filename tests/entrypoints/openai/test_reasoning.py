"""The deepseek_r1 reasoning parser, whole and streamed."""

from __future__ import annotations

import pytest

from tokenmill.entrypoints.openai.reasoning import DeepSeekR1ReasoningParser, get_reasoning_parser

CASES = [
    ("<think>plan</think>answer", "plan", "answer"),
    ("plan</think>answer", "plan", "answer"),  # R1's template opens <think> in the prompt
    ("<think>still thinking", "still thinking", None),
    ("</think>answer", None, "answer"),
    ("<think>a</think>", "a", None),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
def test_split(text: str, reasoning: str | None, content: str | None) -> None:
    assert DeepSeekR1ReasoningParser().split(text) == (reasoning, content)


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_stream_in_pieces_matches_split(
    text: str, reasoning: str | None, content: str | None, step: int
) -> None:
    stream = DeepSeekR1ReasoningParser().stream()
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    got_reasoning, got_content = "", ""
    for i, piece in enumerate(pieces):
        r, c = stream.feed(piece, final=i == len(pieces) - 1)
        got_reasoning += r or ""
        got_content += c or ""
    assert (got_reasoning or None, got_content or None) == (reasoning, content)


def test_unknown_parser() -> None:
    assert get_reasoning_parser(None) is None
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("qwen3")
