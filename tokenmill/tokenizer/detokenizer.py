"""Incremental detokenization of one sequence, with stop strings and held-back streaming text.

Decoding uses vLLM's prefix/read offsets: each new token is decoded together with a few tokens before it,
and only the text past the already-emitted prefix is appended, once it no longer ends in U+FFFD (a UTF-8
character whose bytes are split across tokens is emitted whole, when its last byte arrives).

How the frontend drives it, per `EngineCoreOutput` of the request:

    stop_string = detok.update(out.new_token_ids, stop_terminated=out.finish_reason == FinishReason.STOP,
                               finished=out.finished)
    if stop_string is not None: abort the request in the core, finish_reason "stop", stop_reason stop_string
    text = detok.get_next_output_text(finished, delta=params.output_kind == RequestOutputKind.DELTA)

`stop_terminated`: the last new token is the eos or a stop_token_id that finished the request; its text is
left out unless include_stop_str_in_output (as vLLM does). `finished`: the request's last update; any
incomplete UTF-8 tail is then flushed (as U+FFFD), so the final text equals a full decode.
"""

from __future__ import annotations

from typing import Any

from tokenmill.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, so its leading space comes out right.
INITIAL_PREFIX_TOKENS = 5


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, decoded as they arrive."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop = params.stop_strings
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        # Streaming holds back this many characters: they could start a stop string.
        self.stop_buffer_length = (
            max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop_str_in_output else 0
        )
        self.token_ids: list[int] = []
        self.stop_string: str | None = None  # the stop string that ended the text, once one has
        self._output_text = ""
        self._last_output_offset = 0
        self._special_ids = special_token_ids(tokenizer) if self.skip_special_tokens else set()
        self._added_tokens = _added_tokens(tokenizer)
        self._vocab_size = len(tokenizer)
        self._tokens = self._to_tokens(prompt_token_ids[-INITIAL_PREFIX_TOKENS - 2 :])
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - INITIAL_PREFIX_TOKENS, 0)

    @property
    def output_text(self) -> str:
        """The full text so far (truncated at a matched stop string)."""
        return self._output_text

    def update(
        self, new_token_ids: list[int], stop_terminated: bool = False, finished: bool = False
    ) -> str | None:
        """Append and decode `new_token_ids`; return the stop string that matched, if one did.

        The text is then cut before the stop string (or after it, with include_stop_str_in_output), and
        later updates are ignored.
        """
        if self.stop_string is not None or not new_token_ids:
            return None
        skipped_stop_token = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped_stop_token, new_token_ids = new_token_ids[-1], new_token_ids[:-1]
        start = len(self._output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self._output_text += self._decode_next(token_id)
            if len(self.token_ids) <= self.min_tokens:
                start = len(self._output_text)  # stop strings count only after min_tokens
        if finished or stop_terminated:
            self._output_text += self._flush()
        if skipped_stop_token is not None:
            self.token_ids.append(skipped_stop_token)
        if not self.stop or len(self.token_ids) <= self.min_tokens:
            return None
        return self._check_stop_strings(len(self._output_text) - start)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send: all of it, or with `delta` only what is new since the previous call.

        Until `finished`, the last (longest stop string - 1) characters are held back, so a partial stop
        string is never sent.
        """
        buffer_length = 0 if finished else self.stop_buffer_length
        end = max(len(self._output_text) - buffer_length, 0)
        if not delta:
            return self._output_text[:end]
        start = self._last_output_offset
        if start >= end:
            return ""
        self._last_output_offset = end
        return self._output_text[start:end]

    def _decode_next(self, token_id: int) -> str:
        self._tokens.extend(self._to_tokens([token_id]))
        prefix_text = self._to_string(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._to_string(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still missing bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text) :]

    def _flush(self) -> str:
        """Text of tokens still held back (an incomplete UTF-8 tail, as U+FFFD)."""
        prefix_text = self._to_string(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._to_string(self._tokens[self._prefix_offset :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        """Token strings of `token_ids`, skipped special tokens left out, unknown ids as ""."""
        kept = [t for t in token_ids if t not in self._special_ids]
        known = [t for t in kept if 0 <= t < self._vocab_size]
        strings = iter(self.tokenizer.convert_ids_to_tokens(known) if known else [])
        return [(next(strings) or "") if 0 <= t < self._vocab_size else "" for t in kept]

    def _to_string(self, tokens: list[str]) -> str:
        if getattr(self.tokenizer, "is_fast", False) or not self._added_tokens:
            # Fast tokenizers decode added tokens themselves (without spaces_between_special_tokens, as HF
            # and vLLM): the flag only affects slow tokenizers.
            return str(self.tokenizer.convert_tokens_to_string(tokens))
        return self._to_string_with_added_tokens(tokens)

    def _to_string_with_added_tokens(self, tokens: list[str]) -> str:
        """Slow tokenizers: decode runs of ordinary tokens, join them with the added tokens (HF's rule)."""
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_tokens:
                if run:
                    parts.append(self.tokenizer.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.convert_tokens_to_string(run))
        return (" " if self.spaces_between_special_tokens else "").join(parts)

    def _check_stop_strings(self, num_new_chars: int) -> str | None:
        """Find the earliest stop string that ends in the last `num_new_chars` characters; cut the text."""
        if num_new_chars <= 0:
            return None
        text = self._output_text
        match: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop, max(len(text) - num_new_chars - len(stop) + 1, 0))
            if index != -1 and (match is None or index < match[0]):
                match = (index, stop)
        if match is None:
            return None
        index, stop = match
        self._output_text = text[: index + len(stop) if self.include_stop_str_in_output else index]
        self.stop_string = stop
        return stop


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that skip_special_tokens drops: the special tokens and the added tokens marked special.

    (A fast tokenizer's decode skips every added token marked special, more than `all_special_ids`.)
    """
    ids = set(tokenizer.all_special_ids)
    added: dict[int, Any] = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, token in added.items() if getattr(token, "special", False)}


def _added_tokens(tokenizer: Any) -> set[str]:
    get_added_vocab = getattr(tokenizer, "get_added_vocab", None)
    return set(get_added_vocab()) if get_added_vocab is not None else set()
