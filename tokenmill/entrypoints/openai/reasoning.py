"""Reasoning parsers: split a completion into `reasoning_content` and `content`.

`deepseek_r1` (vLLM's meaning): everything up to `</think>` is reasoning, a leading `<think>` is dropped
(R1's template often puts it in the prompt), and an output with no `</think>` yet is all reasoning.
"""

from __future__ import annotations

REASONING_PARSERS = ("deepseek_r1",)


class DeepSeekR1ReasoningParser:
    start_tag = "<think>"
    end_tag = "</think>"

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole completion; None for an empty part."""
        if text.startswith(self.start_tag):
            text = text[len(self.start_tag) :]
        end = text.find(self.end_tag)
        if end == -1:
            return text or None, None
        reasoning, content = text[:end], text[end + len(self.end_tag) :]
        return reasoning or None, content or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """Splits a streamed completion delta by delta, holding back text that may be the start of a tag."""

    def __init__(self, parser: DeepSeekR1ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str | None, str | None]:
        """The new (reasoning, content) text this delta makes certain; `final` flushes what is held."""
        self.text += delta
        text = self.text if final else self.text[: len(self.text) - self._held_back()]
        reasoning, content = self.parser.split(text)
        new_reasoning = (reasoning or "")[self.sent_reasoning :]
        new_content = (content or "")[self.sent_content :]
        self.sent_reasoning += len(new_reasoning)
        self.sent_content += len(new_content)
        return new_reasoning or None, new_content or None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a tag."""
        tags = (self.parser.start_tag, self.parser.end_tag)
        sizes = [size for tag in tags for size in range(1, len(tag)) if self.text.endswith(tag[:size])]
        return max(sizes, default=0)


def get_reasoning_parser(name: str | None) -> DeepSeekR1ReasoningParser | None:
    if name is None:
        return None
    if name != "deepseek_r1":
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return DeepSeekR1ReasoningParser()
