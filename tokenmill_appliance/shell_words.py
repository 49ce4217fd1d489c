"""Words of a shell command line (VLLM_ARGS, RAY_ARGS), split and expanded as sh would, never run.

What a user writes in VLLM_ARGS means what it means to sh: quotes group and are removed, `\\` escapes,
`$VAR`/`${VAR}` expand outside single quotes (an unset one to nothing; unquoted, a value is split at
its whitespace, and a word that comes to nothing is no word), and an unquoted `;`, `&` or `|` ends a
word and is a word of its own. Nothing runs: `$(...)`, backquotes and globs stay literal text, handed
to the program as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)")
_OPERATORS = ";&|"
_SPECIAL_PARAMETERS = "$?#@*!-0123456789"
_ESCAPED_IN_DOUBLE_QUOTES = '$`"\\\n'


def split(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """`text`'s words; `$` expansions from `env`, or none at all (every `$` literal) when it is None.
    Raises ValueError on an unclosed quote."""
    return _Splitter(text, env).words()


class _Splitter:
    def __init__(self, text: str, env: Mapping[str, str] | None) -> None:
        self.text, self.env, self.i = text, env, 0
        self.result: list[str] = []
        self.word: list[str] = []
        self.quoted = False  # the word holds quotes: it stays a word even when it comes to nothing

    def words(self) -> list[str]:
        while self.i < len(self.text):
            ch = self.text[self.i]
            self.i += 1
            if ch.isspace():
                self.end_word()
            elif ch in _OPERATORS:
                self.end_word()
                self.result.append(self.operator(ch))
            elif ch == "\\":
                self.word.append(self.escaped(ch))
            elif ch == "'":
                self.quoted = True
                self.word.append(self.until("'"))
            elif ch == '"':
                self.quoted = True
                self.double_quoted()
            elif ch == "$":
                self.split_expansion(self.expansion())
            else:
                self.word.append(ch)
        self.end_word()
        return self.result

    def end_word(self) -> None:
        if self.word and (self.quoted or "".join(self.word)):
            self.result.append("".join(self.word))
        self.word, self.quoted = [], False

    def operator(self, ch: str) -> str:
        if self.i < len(self.text) and self.text[self.i] == ch and ch != ";":  # `&&`, `||`
            self.i += 1
            return ch * 2
        return ch

    def escaped(self, backslash: str) -> str:
        if self.i >= len(self.text):
            return backslash  # a trailing backslash stays, as in bash
        ch = self.text[self.i]
        self.i += 1
        return "" if ch == "\n" else ch

    def until(self, quote: str) -> str:
        end = self.text.find(quote, self.i)
        if end < 0:
            raise ValueError("No closing quotation")
        literal, self.i = self.text[self.i : end], end + 1
        return literal

    def double_quoted(self) -> None:
        while self.i < len(self.text):
            ch = self.text[self.i]
            self.i += 1
            if ch == '"':
                return
            if ch == "\\" and self.i < len(self.text) and self.text[self.i] in _ESCAPED_IN_DOUBLE_QUOTES:
                self.word.append(self.escaped(ch))
            elif ch == "$":
                self.word.append(self.expansion())
            else:
                self.word.append(ch)
        raise ValueError("No closing quotation")

    def expansion(self) -> str:
        """The value of the `$NAME`/`${NAME}` at the cursor, or a literal `$` where no name follows."""
        env = self.env
        if self.i < len(self.text) and self.text[self.i] in _SPECIAL_PARAMETERS:
            self.i += 1  # `$$`, `$1`, `$?`...: sh's own, never expanded here
            return "$" + self.text[self.i - 1]
        if env is None or (match := _NAME.match(self.text, self.i)) is None:
            return "$"
        self.i = match.end()
        return env.get(match.group(1) or match.group(2), "")

    def split_expansion(self, value: str) -> None:
        """An unquoted expansion's value, split into words at its whitespace as sh does."""
        first, *rest = re.split(r"\s+", value)
        self.word.append(first)
        for piece in rest:
            self.end_word()
            self.word.append(piece)
