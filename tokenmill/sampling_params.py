"""User-facing sampling parameters, with vLLM's names and defaults."""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from numbers import Integral, Real
from typing import Any


class RequestOutputKind(Enum):
    """What each `RequestOutput` of a request carries."""

    CUMULATIVE = 0  # everything so far (offline default)
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


MAX_TOP_LOGPROBS = 20
# Each stop string is looked for, and each stop id checked, at every generated token: bounded, so that one
# request cannot stall the server (200,000 stop strings held the event loop for 30 s).
MAX_STOP_ENTRIES = 1024
MAX_STOP_STRING_CHARS = 4096
_INTEGER_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTEGER_FIELDS = ("best_of", "max_tokens", "logprobs", "prompt_logprobs", "seed")
_NUMBER_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
# The smallest repetition penalty that stays finite in float32 logits: dividing by a smaller one (or by
# the 0 float32 rounds it to) makes inf and NaN logits, and garbage tokens.
MIN_REPETITION_PENALTY = 1e-30
# Temperatures below this sample greedily (as in vLLM): dividing logits by them would overflow.
SAMPLING_EPS = 1e-5
# The generation_config.json fields that are sampling defaults (max_new_tokens is max_tokens here).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


@dataclass
class SamplingParams:
    """How to sample one request's completions. Invalid values raise ValueError naming the field."""

    n: int = 1
    best_of: int | None = None  # accepted only unset or equal to n (vLLM V1 dropped best_of > n)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these can be sampled
    bad_words: list[str] | None = None  # vLLM's: never generated (their last token is banned after the rest)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the tokenizer and generation config: the ids that end a request.
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # Filled by the engine from bad_words: each word's token ids, with and without a leading space.
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids")
        self.bad_words = _as_list(self.bad_words, "bad_words", "a list of strings")
        if self.allowed_token_ids is not None:  # None: every token; [] is refused
            self.allowed_token_ids = _as_list(
                self.allowed_token_ids, "allowed_token_ids", "a list of token ids"
            )
        if self.top_k == -1:
            self.top_k = 0
        # Logprobs unbounded here: the engine's limit (--max-logprobs, 20 by default) is applied when the
        # request is added, and may be higher.
        self.validate(max_logprobs=-1)

    def validate(self, max_logprobs: int = MAX_TOP_LOGPROBS) -> None:
        self._validate_types()
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(
            self.best_of is None or self.best_of == self.n,
            "best_of",
            f"is not supported: leave it unset or equal to n ({self.n}), got {self.best_of}",
        )
        _check(self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be 0 or -1 (disabled) or at least 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _check(
            self.repetition_penalty >= MIN_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be greater than 0 (at least {MIN_REPETITION_PENALTY:g}), got {self.repetition_penalty}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"must be at least 1, got {self.max_tokens}",
        )
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if max_logprobs < 0:  # --max-logprobs -1: no limit (vLLM's meaning)
                _check(value is None or value >= 0, name, f"must be non-negative, got {value}")
            else:
                _check(
                    value is None or 0 <= value <= max_logprobs,
                    name,
                    f"must be between 0 and {max_logprobs}, got {value}",
                )
        _check(all(isinstance(s, str) and s for s in self.stop or []), "stop", "must be non-empty strings")
        _check(
            all(isinstance(w, str) and w.strip() for w in self.bad_words or []),
            "bad_words",
            "must be non-empty strings",
        )
        _check(
            len(self.stop or []) <= MAX_STOP_ENTRIES, "stop", f"may hold at most {MAX_STOP_ENTRIES} strings"
        )
        _check(
            all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop or []),
            "stop",
            f"strings may be at most {MAX_STOP_STRING_CHARS} characters long",
        )
        _check(
            len(self.stop_token_ids or []) <= MAX_STOP_ENTRIES,
            "stop_token_ids",
            f"may hold at most {MAX_STOP_ENTRIES} ids",
        )
        _check(all(t >= 0 for t in self.stop_token_ids or []), "stop_token_ids", "must be non-negative")
        if self.allowed_token_ids is not None:
            allowed = self.allowed_token_ids
            _check(bool(allowed), "allowed_token_ids", "must hold at least one token id")
            _check(all(t >= 0 for t in allowed), "allowed_token_ids", "must be non-negative")
        for token_id, bias in (self.logit_bias or {}).items():
            _check(
                _is_integer(token_id) and token_id >= 0,
                "logit_bias",
                f"keys must be token ids (non-negative integers), got {token_id!r}",
            )
            _check(
                _is_number(bias), "logit_bias", f"bias for token {token_id} must be a number, got {bias!r}"
            )
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"bias for token {token_id} must be in [-100, 100]")

    def _validate_types(self) -> None:
        """Types first, so that a range check never meets a string (or 1.5 tokens) and fails obscurely."""
        for name in _INTEGER_FIELDS + _OPTIONAL_INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None or name in _INTEGER_FIELDS:
                _check(_is_integer(value), name, f"must be an integer, got {value!r}")
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            _check(_is_number(value), name, f"must be a number, got {value!r}")
            # nan fails every range check, but inf passes the open-ended ones (temperature, repetition).
            _check(not math.isinf(value), name, f"must be finite, got {value!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or []
            _check(all(_is_integer(t) for t in ids), name, f"must be integers, got {ids!r}")
        _check(
            self.logit_bias is None or isinstance(self.logit_bias, Mapping),
            "logit_bias",
            f"must map token ids to biases, got {self.logit_bias!r}",
        )
        _check(
            isinstance(self.output_kind, RequestOutputKind),
            "output_kind",
            f"must be a RequestOutputKind, got {self.output_kind!r}",
        )
        _check(
            self.seed is None or -(2**63) <= self.seed < 2**64,
            "seed",
            f"must fit in 64 bits, got {self.seed}",
        )

    def validate_token_ids(self, vocab_size: int) -> None:
        """Check the token ids in logit_bias, stop_token_ids and allowed_token_ids against the model's
        vocabulary."""
        for name, ids in (
            ("logit_bias", self.logit_bias or {}),
            ("stop_token_ids", self.stop_token_ids or []),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            bad = [t for t in ids if t >= vocab_size]
            _check(not bad, name, f"has token ids {bad} outside the vocabulary (size {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that finish the request once sampled (eos unless ignore_eos, plus stop_token_ids)."""
        ids = set(self.stop_token_ids or [])
        if not self.ignore_eos:
            ids |= self.eos_token_ids
        return ids


def from_generation_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Generation-config sampling fields (GENERATION_CONFIG_KEYS) by SamplingParams name."""
    return {("max_tokens" if name == "max_new_tokens" else name): value for name, value in values.items()}


class InvalidParameterError(ValueError):
    """A sampling parameter out of its range or of the wrong type; `param` names it (the OpenAI error
    body's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _is_integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)  # True is no count of anything


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_list(values: Any, field_name: str, expected: str) -> list[Any]:
    """A list of `values` (any iterable but a string or mapping); None is empty."""
    if values is None:
        return []
    _check(
        isinstance(values, Iterable) and not isinstance(values, str | bytes | Mapping),
        field_name,
        f"must be {expected}, got {values!r}",
    )
    return list(values)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(field_name, message)
