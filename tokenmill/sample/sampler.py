"""The batched sampler: one step's logits -> one token per row, on the logits' device.

Order, as in vLLM: logprobs of the raw logits; logit_bias; min_tokens masking; penalties; greedy argmax
for temperature-0 rows; temperature; top_k, top_p, min_p; then random rows sample with the
exponential-race trick, argmax(probs / q) with q ~ Exponential(1), which draws exactly `vocab` numbers per
row. A seeded row draws its q from its own generator only, so its tokens do not depend on the other rows
of the batch and reruns reproduce them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sample.logprobs import LogprobsTensors, gather_logprobs
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.penalties import apply_penalties


@dataclass
class SamplerOutput:
    """One step's sampled tokens (and their logprobs when any row asked), on the logits' device."""

    sampled_token_ids: torch.Tensor  # [num_rows] int64
    logprobs: LogprobsTensors | None  # None when no row wants logprobs


class Sampler(torch.nn.Module):
    """Samples one token per row of `logits` ([num_rows, vocab], any float dtype) as `metadata` says."""

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [num_rows, vocab]
        if metadata.all_greedy and metadata.no_logits_processing:
            sampled = logits.argmax(dim=-1)  # fast path: a plain greedy batch
        else:
            # A float32 copy: the steps below work in place and must not touch the caller's logits.
            processed = apply_logits_processing(logits.to(torch.float32, copy=True), metadata)
            sampled = sample(processed, metadata)
        logprobs = None
        if raw_logprobs is not None and metadata.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def apply_logits_processing(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """logit_bias, min_tokens masking and penalties, in place on float32 `logits` [num_rows, vocab]."""
    if metadata.logit_bias is not None:
        bias = metadata.logit_bias
        logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    if metadata.min_tokens_mask is not None:
        mask = metadata.min_tokens_mask
        logits.index_put_((mask.rows, mask.token_ids), mask.values)
    if metadata.penalties is not None:
        apply_penalties(logits, metadata.penalties)
    return logits


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """[num_rows] int64 token ids from processed float32 `logits` [num_rows, vocab] (modified in place)."""
    if metadata.temperature is None:  # all rows greedy
        return logits.argmax(dim=-1)
    # Mixed batch: greedy rows take the argmax before temperature (their temperature is set to 1).
    greedy = None if metadata.is_greedy is None else logits.argmax(dim=-1)  # [num_rows]
    logits.div_(metadata.temperature.unsqueeze(1))
    logits = apply_top_k_top_p(logits, metadata)
    if metadata.min_p is not None:
        apply_min_p(logits, metadata.min_p)
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    sampled = random_sample(probs, metadata.generators)
    if greedy is None or metadata.is_greedy is None:
        return sampled
    return torch.where(metadata.is_greedy, greedy, sampled)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / q), q ~ Exponential(1): a sample from each row of `probs` [num_rows, vocab]."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # Exponential draws of exactly 0 would divide to inf (or nan for a zero prob).
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Mask (-inf) the logits outside each row's top_k tokens and outside its top_p nucleus."""
    top_k, top_p = metadata.top_k, metadata.top_p
    if top_k is None:
        return logits if top_p is None else apply_top_p_sorted(logits, top_p)
    if top_p is None:
        return apply_top_k_only(logits, top_k.k, top_k.max_k)
    if top_k.limited_rows is None or top_k.unlimited_rows is None:  # every row has a top_k
        return apply_top_k_then_top_p(logits, top_k.k, top_k.max_k, top_p)
    limited, unlimited = top_k.limited_rows, top_k.unlimited_rows
    logits[limited] = apply_top_k_then_top_p(logits[limited], top_k.k[limited], top_k.max_k, top_p[limited])
    logits[unlimited] = apply_top_p_sorted(logits[unlimited], top_p[unlimited])
    return logits


def apply_top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p by sorting the vocabulary: drop the least likely tokens holding at most 1 - top_p."""
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending, [num_rows, vocab]
    cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)  # [num_rows, vocab]
    outside = cumulative <= 1.0 - top_p.unsqueeze(1)
    outside[:, -1] = False  # the most likely token always stays
    sorted_logits.masked_fill_(outside, float("-inf"))
    return logits.scatter_(dim=-1, index=sorted_ids, src=sorted_logits)


def apply_top_k_then_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then the nucleus within it, from one topk of the batch's largest k: no vocabulary sort.

    Every row must have a top_k. Probabilities come from a softmax over the whole (masked) vocabulary, a
    length that does not depend on the batch's largest k, so a row's result does not either.
    """
    values, token_ids = logits.topk(max_top_k, dim=-1)  # [num_rows, max_top_k], descending
    positions = torch.arange(max_top_k, device=logits.device)
    values.masked_fill_(positions >= top_k.unsqueeze(1), float("-inf"))
    logits.fill_(float("-inf")).scatter_(1, token_ids, values)  # only each row's top-k left
    probs = logits.softmax(dim=-1).gather(1, token_ids)  # [num_rows, max_top_k], descending
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    has_top_p = (top_p < 1.0).unsqueeze(1)  # [num_rows, 1]; rounding must not cut rows without top_p
    values.masked_fill_((mass_before >= top_p.unsqueeze(1)) & has_top_p, float("-inf"))
    return logits.scatter_(1, token_ids, values)


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a full sort: one topk of the largest k in the batch. `top_k` = vocab where off."""
    is_off = top_k >= logits.shape[-1]  # [num_rows]
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_rows, max_top_k], descending
    index = (top_k.clamp(max=max_top_k) - 1).unsqueeze(1)  # [num_rows, 1]
    threshold = top_values.gather(1, index).masked_fill_(is_off.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < threshold, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times that of the row's most likely token."""
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))
