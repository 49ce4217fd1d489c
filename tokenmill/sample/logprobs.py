"""Logprobs of chosen tokens and the top-k alternatives, on device, and their user-facing form.

Logprobs are those of the model's raw logits (log_softmax in float32, before logit_bias, penalties,
temperature and truncation), as vLLM reports by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.engine.outputs import Logprob, LogprobsLists, SampleLogprobs


@dataclass
class LogprobsTensors:
    """Row i: the chosen token first, then the `k` most likely tokens by logprob, on the logits' device."""

    token_ids: torch.Tensor  # [num_rows, 1 + k] int64
    logprobs: torch.Tensor  # [num_rows, 1 + k] float32
    ranks: torch.Tensor  # [num_rows] int64, rank of the chosen token (1 = most likely)

    def tolists(self) -> LogprobsLists:
        """Host copy of all rows, in a single device->host transfer."""
        return unpack_logprobs(self.packed().cpu())

    def packed(self) -> torch.Tensor:
        """All rows in one tensor on the device, [num_rows, 2 * (1 + k) + 1] float64, for one copy to the
        host (float64 holds int64 ids and ranks below 2**53 and float32 logprobs exactly)."""
        return torch.cat(
            [self.token_ids.double(), self.logprobs.double(), self.ranks.double().unsqueeze(1)], dim=1
        )

    def slice(self, start: int, end: int) -> LogprobsTensors:
        return LogprobsTensors(self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end])


def unpack_logprobs(packed: torch.Tensor) -> LogprobsLists:
    """`LogprobsTensors.packed()`, on the host, as lists."""
    width = (packed.shape[1] - 1) // 2
    return LogprobsLists(
        token_ids=packed[:, :width].long().tolist(),
        logprobs=packed[:, width : 2 * width].tolist(),
        ranks=packed[:, 2 * width].long().tolist(),
    )


def compute_logprobs(logits: torch.Tensor, chosen_token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Logprobs of `chosen_token_ids` and the `num_top` most likely tokens of each row of raw `logits`.

    Used for sampled tokens and for prompt logprobs (chosen = the next prompt token).
    """
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [num_rows, vocab]
    return gather_logprobs(logprobs, chosen_token_ids, num_top)


def gather_logprobs(logprobs: torch.Tensor, chosen_token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Like `compute_logprobs`, from logprobs already normalized. `logprobs`: [num_rows, vocab]."""
    chosen = chosen_token_ids.to(torch.int64).unsqueeze(1)  # [num_rows, 1]
    chosen_logprobs = logprobs.gather(1, chosen)  # [num_rows, 1]
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1  # [num_rows]
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [num_rows, num_top]
        token_ids = torch.cat([chosen, top_ids], dim=1)
        values = torch.cat([chosen_logprobs, top_logprobs], dim=1)
    else:
        token_ids, values = chosen, chosen_logprobs
    return LogprobsTensors(token_ids=token_ids, logprobs=values, ranks=ranks)


def to_sample_logprobs(
    lists: LogprobsLists, tokenizer: Any, num_top_per_row: int | list[int]
) -> SampleLogprobs:
    """One dict per row: the chosen token (with its rank), then the row's request's top `num_top` tokens.

    `num_top_per_row` is one count for all rows or one per row; it may be smaller than the width the
    batch was computed with. decoded_token is the tokenizer's decode of the single id, as in vLLM.
    """
    num_rows = len(lists.token_ids)
    counts = [num_top_per_row] * num_rows if isinstance(num_top_per_row, int) else num_top_per_row
    if len(counts) != num_rows:
        raise ValueError(f"num_top_per_row has {len(counts)} entries for {num_rows} rows")
    rows_ids = [ids[: 1 + n] for ids, n in zip(lists.token_ids, counts, strict=True)]
    texts = _decode_each(tokenizer, {i for ids in rows_ids for i in ids})
    result: SampleLogprobs = []
    for ids, logprobs, rank in zip(rows_ids, lists.logprobs, lists.ranks, strict=True):
        row = {ids[0]: Logprob(logprobs[0], rank, texts[ids[0]])}
        for top_rank, (token_id, logprob) in enumerate(zip(ids[1:], logprobs[1:], strict=False), start=1):
            # The chosen token may also be in the top-k; keep its entry (and its tie-aware rank).
            row.setdefault(token_id, Logprob(logprob, top_rank, texts[token_id]))
        result.append(row)
    return result


def _decode_each(tokenizer: Any, token_ids: set[int]) -> dict[int, str]:
    ordered = sorted(token_ids)
    texts = tokenizer.batch_decode([[i] for i in ordered]) if ordered else []
    return {i: text or "" for i, text in zip(ordered, texts, strict=True)}
