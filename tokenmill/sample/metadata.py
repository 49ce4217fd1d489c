"""Per-step sampling state of a batch: one row per sequence that samples, as tensors on the logits' device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.sample.device import to_device
from tokenmill.sample.penalties import PenaltyTensors, TokenIds
from tokenmill.sampling_params import SamplingParams


@dataclass
class SparseLogits:
    """Sparse (row, token) entries of a batch, e.g. logit_bias values or tokens masked by min_tokens."""

    rows: torch.Tensor  # [num_entries] int64
    token_ids: torch.Tensor  # [num_entries] int64
    values: torch.Tensor  # [num_entries] float32

    @classmethod
    def build(
        cls, entries: list[tuple[int, int, float]], vocab_size: int, device: torch.device
    ) -> SparseLogits | None:
        """None when there are no entries. Token ids outside the vocabulary are dropped."""
        entries = [e for e in entries if 0 <= e[1] < vocab_size]
        if not entries:
            return None
        rows, token_ids, values = zip(*entries, strict=True)
        index = to_device(torch.tensor([rows, token_ids], dtype=torch.int64), device)  # [2, num_entries]
        return cls(index[0], index[1], to_device(torch.tensor(values, dtype=torch.float32), device))


@dataclass
class AllowedTokens:
    """The rows that may sample only some tokens (allowed_token_ids), and those tokens."""

    rows: torch.Tensor  # [num_restricted] int64
    allowed: SparseLogits  # (row, token id) of every allowed token, values unused

    @classmethod
    def build(
        cls, params: list[SamplingParams], vocab_size: int, device: torch.device
    ) -> AllowedTokens | None:
        entries = [
            (row, token_id, 0.0) for row, p in enumerate(params) for token_id in p.allowed_token_ids or []
        ]
        allowed = SparseLogits.build(entries, vocab_size, device)
        if allowed is None:
            return None
        rows = [row for row, p in enumerate(params) if p.allowed_token_ids]
        return cls(to_device(torch.tensor(rows, dtype=torch.int64), device), allowed)


@dataclass
class TopK:
    """The top_k of each row of a batch in which some random row has one."""

    k: torch.Tensor  # [num_rows] int64, vocab_size on rows without a limit
    max_k: int  # the largest k, so that topk needs no device sync
    # When only some rows have a limit: the rows with one and the rows without (top-p takes a different
    # path for each, chosen by the row's own parameters so that its tokens do not depend on the batch).
    limited_rows: torch.Tensor | None  # [num_limited] int64
    unlimited_rows: torch.Tensor | None  # [num_rows - num_limited] int64

    @classmethod
    def build(
        cls, rows: list[tuple[SamplingParams, bool]], vocab_size: int, device: torch.device
    ) -> TopK | None:
        """`rows`: (params, is_random) per row. None when no random row has a top_k."""
        # Greedy rows take k = 1: their sampled token is discarded, and a limit on every row is faster.
        top_k = [(p.top_k if 0 < p.top_k < vocab_size else vocab_size) if r else 1 for p, r in rows]
        random_top_k = [k for k, (_, r) in zip(top_k, rows, strict=True) if r and k < vocab_size]
        if not random_top_k:
            return None
        limited = [i for i, k in enumerate(top_k) if k < vocab_size]
        unlimited = [i for i, k in enumerate(top_k) if k >= vocab_size]
        return cls(
            k=to_device(torch.tensor(top_k, dtype=torch.int64), device),
            max_k=max(random_top_k),
            limited_rows=to_device(torch.tensor(limited), device) if unlimited else None,
            unlimited_rows=to_device(torch.tensor(unlimited), device) if unlimited else None,
        )


@dataclass
class SamplingMetadata:
    """How to sample each row of one step's logits. Fields that no row uses are None (fast paths)."""

    num_rows: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [num_rows] float32, 1.0 on greedy rows; None when all greedy
    is_greedy: torch.Tensor | None  # [num_rows] bool; None when all rows are greedy or all random
    top_k: TopK | None  # None when no row uses it
    top_p: torch.Tensor | None  # [num_rows] float32, 1.0 where off
    min_p: torch.Tensor | None  # [num_rows] float32, 0.0 where off
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded random rows)
    default_generator: torch.Generator | None  # the other random rows' (the engine's seed); None: torch's
    logit_bias: SparseLogits | None  # added to the logits
    allowed_tokens: AllowedTokens | None  # every other token of those rows masked (-inf)
    banned_tokens: SparseLogits | None  # masked (-inf): stop ids under min_tokens, bad words' next tokens
    penalties: PenaltyTensors | None
    max_num_logprobs: int | None  # widest top-k logprobs any row wants; None: no row wants logprobs

    @property
    def no_penalties(self) -> bool:
        return self.penalties is None

    @property
    def no_logit_bias(self) -> bool:
        return self.logit_bias is None

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_logits_processing(self) -> bool:
        """True when the logits go to sampling unchanged by bias, allowed or banned tokens (min_tokens,
        bad words) or penalties."""
        return (
            self.logit_bias is None
            and self.allowed_tokens is None
            and self.banned_tokens is None
            and self.penalties is None
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: Sequence[TokenIds],
        output_token_ids: Sequence[TokenIds],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        default_generator: torch.Generator | None = None,
    ) -> SamplingMetadata:
        """Metadata of the rows sampled this step, in batch order.

        `vocab_size` is the logits' width. `generators[i]` is row i's own generator on `device` (from its
        seed) or None for `default_generator`; greedy rows ignore it. Token ids are read only for rows
        with penalties, every step: a caller can pass each request's prompt as an int64 numpy array it
        keeps, so that long prompts cost nothing to convert.
        """
        num_rows = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows:
            raise ValueError("params, prompt_token_ids, output_token_ids and generators differ in length")
        greedy = [p.is_greedy for p in params]
        random_params = [p for p, g in zip(params, greedy, strict=True) if not g]
        all_greedy, all_random = not random_params, not any(greedy)
        # Greedy rows get neutral values: temperature 1 (never a division by 0), no truncation.
        rows = [(p, not g) for p, g in zip(params, greedy, strict=True)]
        # All greedy: no copy to the device at all.
        floats = None if all_greedy else _random_row_floats(rows, device)  # [3, num_rows]
        return cls(
            num_rows=num_rows,
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=None if floats is None else floats[0],
            is_greedy=None if all_greedy or all_random else to_device(torch.tensor(greedy), device),
            top_k=TopK.build(rows, vocab_size, device),
            top_p=floats[1] if floats is not None and any(p.top_p < 1.0 for p in random_params) else None,
            min_p=floats[2] if floats is not None and any(p.min_p > 0.0 for p in random_params) else None,
            generators={i: gen for i, gen in enumerate(generators) if gen is not None and not greedy[i]},
            default_generator=default_generator,
            logit_bias=SparseLogits.build(_logit_bias_entries(params), vocab_size, device),
            allowed_tokens=AllowedTokens.build(params, vocab_size, device),
            banned_tokens=SparseLogits.build(
                _min_tokens_entries(params, output_token_ids) + _bad_words_entries(params, output_token_ids),
                vocab_size,
                device,
            ),
            penalties=PenaltyTensors.build(params, prompt_token_ids, output_token_ids, vocab_size, device),
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        )


def _random_row_floats(rows: list[tuple[SamplingParams, bool]], device: torch.device) -> torch.Tensor:
    """[3, num_rows]: temperature, top_p and min_p of each (params, is_random) row; neutral on greedy rows."""
    floats = [
        [p.temperature if is_random else 1.0 for p, is_random in rows],
        [p.top_p if is_random else 1.0 for p, is_random in rows],
        [p.min_p if is_random else 0.0 for p, is_random in rows],
    ]
    return to_device(torch.tensor(floats, dtype=torch.float32), device)


def _logit_bias_entries(params: list[SamplingParams]) -> list[tuple[int, int, float]]:
    return [
        (row, token_id, bias)
        for row, p in enumerate(params)
        for token_id, bias in (p.logit_bias or {}).items()
    ]


def _min_tokens_entries(
    params: list[SamplingParams], output_token_ids: Sequence[TokenIds]
) -> list[tuple[int, int, float]]:
    """(row, stop token id, -inf) for each row whose output is still shorter than its min_tokens."""
    return [
        (row, token_id, float("-inf"))
        for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True))
        if len(output) < p.min_tokens
        for token_id in sorted(p.all_stop_token_ids)
    ]


def _bad_words_entries(
    params: list[SamplingParams], output_token_ids: Sequence[TokenIds]
) -> list[tuple[int, int, float]]:
    """(row, token id, -inf) for each bad word whose last token would complete it now: a one-token word
    always, a longer one when the output ends with all of its tokens but the last."""
    entries = []
    for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):
        for word in p.bad_words_token_ids:
            prefix = word[:-1]
            if not prefix or (len(output) >= len(prefix) and list(output[-len(prefix) :]) == prefix):
                entries.append((row, word[-1], float("-inf")))
    return entries
