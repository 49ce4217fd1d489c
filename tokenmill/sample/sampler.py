"""The batched sampler: one step's logits -> one token per row, on the logits' device.

Order, as in vLLM: logprobs of the raw logits; logit_bias; allowed_token_ids; min_tokens and bad_words
masking; penalties; greedy argmax for temperature-0 rows; temperature; top_k, top_p, min_p; then random
rows sample with the exponential-race trick, argmax(probs / q) with q ~ Exponential(1). A seeded row
draws its q from its own generator only, and how many it draws depends on its own row alone, so its
tokens do not depend on the other rows of the batch and reruns reproduce them.

CPU fast paths (a vocabulary sort and a vocabulary of Exponential draws per row dominate a CPU decode
step): top_p looks for the nucleus in each row's FAST_PATH_CANDIDATES most likely tokens and sorts only
the rows whose nucleus is wider, keeping exactly the tokens the full sort keeps; a row left with at most
FAST_PATH_CANDIDATES tokens after truncation races over those only; a wider row inverts its cumulative
probabilities at one uniform draw instead of racing (the same distribution). The first two need
host-side decisions, so CUDA tensors always take the sync-free full-vocabulary race.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.kernels import cpu as kernels
from tokenmill.kernels.cpu import kernel_library
from tokenmill.sample.logprobs import LogprobsTensors, gather_logprobs
from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.penalties import apply_penalties

# How many of a row's most likely tokens the CPU fast paths look at (a topk of 256 costs ~1/20 of a sort
# of a 49152-token vocabulary, one of 1024 ~1/8).
FAST_PATH_CANDIDATES = 256
MAX_CDF_CHUNK = 256  # tokens per chunk of `inverse_cdf_sample`'s first level (a power of two)


@dataclass
class SamplerOutput:
    """One step's sampled tokens (and their logprobs when any row asked), on the logits' device."""

    sampled_token_ids: torch.Tensor  # [num_rows] int64
    logprobs: LogprobsTensors | None  # None when no row wants logprobs


class Sampler(torch.nn.Module):
    """Samples one token per row of `logits` ([num_rows, vocab], any float dtype) as `metadata` says.

    `cpu_fast_paths=False` keeps CPU tensors on the full-vocabulary paths (the benchmark's baseline).
    """

    def __init__(self, cpu_fast_paths: bool = True) -> None:
        super().__init__()
        self.cpu_fast_paths = cpu_fast_paths

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [num_rows, vocab]
        if metadata.all_greedy and metadata.no_logits_processing:
            sampled = argmax_rows(logits)  # fast path: a plain greedy batch
        else:
            # A float32 copy: the steps below work in place and must not touch the caller's logits.
            processed = apply_logits_processing(logits.to(torch.float32, copy=True), metadata)
            fast = self.cpu_fast_paths and logits.device.type == "cpu"
            sampled = sample(processed, metadata, fast)
        logprobs = None
        if raw_logprobs is not None and metadata.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[num_rows] int64: each row's first maximal index, NaN counting as the maximum (`argmax`'s answer).
    On CPU our kernel, else `max`'s indices, give it faster than argmax's own CPU kernel (64 rows of a
    49152-token vocabulary: 0.43 / 0.87 / 2.5 ms, against a batch-64 decode step of ~50 ms)."""
    if x.device.type != "cpu":
        return x.argmax(dim=-1)
    if x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1:
        library = kernel_library()
        if library is not None:
            return kernels.argmax_rows(library, x)
    return x.max(dim=-1).indices


def apply_logits_processing(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """logit_bias, allowed_token_ids, min_tokens and bad_words masking and penalties, in place on `logits`
    [num_rows, vocab]."""
    if metadata.logit_bias is not None:
        bias = metadata.logit_bias
        logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    if metadata.allowed_tokens is not None:
        allowed = metadata.allowed_tokens.allowed
        kept = logits[allowed.rows, allowed.token_ids]
        logits.index_fill_(0, metadata.allowed_tokens.rows, float("-inf"))
        logits.index_put_((allowed.rows, allowed.token_ids), kept)
    if metadata.banned_tokens is not None:
        banned = metadata.banned_tokens
        logits.index_put_((banned.rows, banned.token_ids), banned.values)
    if metadata.penalties is not None:
        apply_penalties(logits, metadata.penalties)
    return logits


def sample(logits: torch.Tensor, metadata: SamplingMetadata, cpu_fast_paths: bool = False) -> torch.Tensor:
    """[num_rows] int64 token ids from processed float32 `logits` [num_rows, vocab] (modified in place).

    `cpu_fast_paths`: the caller has checked that `logits` is on the CPU and allows the fast paths.
    """
    if metadata.temperature is None:  # all rows greedy
        return argmax_rows(logits)
    # Mixed batch: greedy rows take the argmax before temperature (their temperature is set to 1).
    greedy = None if metadata.is_greedy is None else argmax_rows(logits)  # [num_rows]
    logits.div_(metadata.temperature.unsqueeze(1))
    logits = apply_top_k_top_p(logits, metadata, cpu_fast_paths)
    if metadata.min_p is not None:
        apply_min_p(logits, metadata.min_p)
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    is_truncated = not (metadata.no_top_k and metadata.no_top_p and metadata.no_min_p)
    if cpu_fast_paths and is_truncated:
        sampled = random_sample_candidates(probs, metadata)
    elif cpu_fast_paths:
        sampled = inverse_cdf_sample(probs, metadata.generators, metadata.default_generator)
    else:
        sampled = random_sample(probs, metadata.generators, metadata.default_generator)
    if greedy is None or metadata.is_greedy is None:
        return sampled
    return torch.where(metadata.is_greedy, greedy, sampled)


def random_sample(
    probs: torch.Tensor, generators: dict[int, torch.Generator], default: torch.Generator | None = None
) -> torch.Tensor:
    """argmax(probs / q), q ~ Exponential(1): a sample from each row of `probs` [num_rows, width].

    A seeded row draws exactly `width` numbers from its generator; the other rows draw from `default`.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_(generator=default)
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # Exponential draws of exactly 0 would divide to inf (or nan for a zero prob).
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return argmax_rows(probs.div_(q))


def inverse_cdf_sample(
    probs: torch.Tensor, generators: dict[int, torch.Generator], default: torch.Generator | None = None
) -> torch.Tensor:
    """A sample from each row of CPU `probs` [num_rows, width], by inverting the row's cumulative sum at
    one uniform draw. A seeded row draws that one number from its generator; the other rows draw from
    `default`. On CPU an Exponential draw costs ~20 ns, so the race (`random_sample`) over a vocabulary
    is what a sampled decode step spends most on; this reads `probs` once.

    Two levels, so no vocabulary-wide running sum is written: the sums of chunks of up to 256 tokens
    (float32 sums, exact to ~1e-7 of the chunk's mass) choose the chunk, then the chunk's own running
    sum in float64 chooses the token, the draw rescaled to that sum so the chunk's tokens keep their
    proportions. The first sum above a target below the total belongs to a token of nonzero probability.
    """
    num_rows, width = probs.shape
    chunk_width = math.gcd(width, MAX_CDF_CHUNK)  # divides the width: chunks view `probs`, no padding
    chunks = probs.reshape(num_rows, -1, chunk_width)  # [num_rows, num_chunks, chunk_width]
    chunk_sums = chunks.sum(dim=-1).double()  # [num_rows, num_chunks]
    cdf = chunk_sums.cumsum(dim=-1)
    draws = torch.empty(num_rows, 1, dtype=torch.float64)
    if len(generators) < num_rows:
        draws.uniform_(generator=default)
    for row, generator in generators.items():
        draws[row].uniform_(generator=generator)
    target = _below(draws * cdf[:, -1:], cdf[:, -1:])  # [num_rows, 1]
    chunk = torch.searchsorted(cdf, target, right=True).clamp_max_(cdf.shape[1] - 1)  # [num_rows, 1]
    mass = chunk_sums.gather(1, chunk)
    within = chunks.gather(1, chunk.unsqueeze(2).expand(-1, -1, chunk_width)).squeeze(1)
    inner_cdf = within.cumsum(dim=-1, dtype=torch.float64)  # [num_rows, chunk_width]
    offset = (target - (cdf.gather(1, chunk) - mass)).clamp_min_(0) * (inner_cdf[:, -1:] / mass)
    token = torch.searchsorted(inner_cdf, _below(offset, inner_cdf[:, -1:]), right=True)
    return (chunk * chunk_width + token.clamp_max_(chunk_width - 1)).squeeze(1)


def _below(value: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """`value`, at most the largest float below `limit` (rounding must not reach a row's total)."""
    return torch.minimum(value, torch.nextafter(limit, torch.zeros_like(limit)))


def random_sample_candidates(probs: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """A sample from each row of CPU `probs` [num_rows, vocab], racing only over each row's candidates.

    A row with at most FAST_PATH_CANDIDATES tokens of nonzero probability races over its
    FAST_PATH_CANDIDATES most likely tokens (the zeros among them never win), so a seeded row draws
    exactly that many numbers; a wider row inverts its cumulative sum (`inverse_cdf_sample`, one number).
    Either way the count depends on the row alone, and the distribution is that of the full race.
    """
    num_rows, vocab = probs.shape
    generators, default = metadata.generators, metadata.default_generator
    if vocab <= FAST_PATH_CANDIDATES:
        return random_sample(probs, generators, default)
    # One more than the candidates: a row fits when that one has probability 0.
    top_probs, top_ids = probs.topk(FAST_PATH_CANDIDATES + 1, dim=-1)  # [num_rows, candidates + 1]
    fits = top_probs[:, -1] == 0.0  # [num_rows]
    if metadata.is_greedy is not None:
        fits |= metadata.is_greedy  # their sample is discarded: the cheapest race will do
    if bool(fits.all()):
        winners = random_sample(top_probs[:, :-1], generators, default)  # [num_rows]
        return top_ids.gather(1, winners.unsqueeze(1)).squeeze(1)
    sampled = torch.empty(num_rows, dtype=torch.int64)
    narrow, wide = fits.nonzero().squeeze(1), (~fits).nonzero().squeeze(1)
    if narrow.numel() > 0:
        narrow_generators = _generators_of(narrow, generators)
        winners = random_sample(top_probs[narrow, :-1], narrow_generators, default)  # [num_narrow]
        sampled[narrow] = top_ids[narrow].gather(1, winners.unsqueeze(1)).squeeze(1)
    sampled[wide] = inverse_cdf_sample(probs[wide], _generators_of(wide, generators), default)
    return sampled


def _generators_of(rows: torch.Tensor, generators: dict[int, torch.Generator]) -> dict[int, torch.Generator]:
    """`generators` re-keyed by position in `rows` (a CPU [num_selected] int64 tensor of row numbers)."""
    return {i: generators[row] for i, row in enumerate(rows.tolist()) if row in generators}


def apply_top_k_top_p(
    logits: torch.Tensor, metadata: SamplingMetadata, cpu_fast_paths: bool = False
) -> torch.Tensor:
    """Mask (-inf) the logits outside each row's top_k tokens and outside its top_p nucleus."""
    top_k, top_p = metadata.top_k, metadata.top_p
    if top_k is None:
        return logits if top_p is None else apply_top_p(logits, top_p, cpu_fast_paths)
    if top_p is None:
        return apply_top_k_only(logits, top_k.k, top_k.max_k)
    if top_k.limited_rows is None or top_k.unlimited_rows is None:  # every row has a top_k
        return apply_top_k_then_top_p(logits, top_k.k, top_k.max_k, top_p)
    limited, unlimited = top_k.limited_rows, top_k.unlimited_rows
    logits[limited] = apply_top_k_then_top_p(logits[limited], top_k.k[limited], top_k.max_k, top_p[limited])
    logits[unlimited] = apply_top_p(logits[unlimited], top_p[unlimited], cpu_fast_paths)
    return logits


def nucleus_threshold(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest probability top_p keeps in each row, from the row's most likely probabilities.

    `sorted_probs` [num_rows, width] holds each row's `width` largest probabilities in descending order
    (the whole sorted vocabulary, or a prefix of it). Top-p keeps a token when the tokens before it hold
    less than top_p, and every token as likely as the last one kept (ties are all in or all out, as in
    top_k). Returns the threshold [num_rows, 1] (0 on rows with top_p >= 1: nothing is cut) and whether
    the prefix decided the row [num_rows] bool: when its mass reaches top_p, the full sort's cut lies
    inside it. On CPU, cumsum adds sequentially in float64, so a prefix's sums are bit-equal to the full
    sort's: the fast path and the full sort keep the same tokens.
    """
    cumulative = sorted_probs.cumsum(dim=-1)  # [num_rows, width]
    top_p = top_p.unsqueeze(1)  # [num_rows, 1]
    num_kept = 1 + (cumulative[:, :-1] < top_p).sum(dim=-1, keepdim=True)  # [num_rows, 1]
    no_cut = top_p >= 1.0  # rounding must not cut rows without top_p
    threshold = sorted_probs.gather(1, num_kept - 1).masked_fill_(no_cut, 0.0)
    is_decided = (cumulative[:, -1:] >= top_p) | no_cut
    return threshold, is_decided.squeeze(1)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, cpu_fast_paths: bool = False) -> torch.Tensor:
    """Top-p; on CPU with `cpu_fast_paths`, without sorting the rows whose nucleus is in their top tokens.

    Keeps the same tokens as `apply_top_p_sorted`. Whether a row is sorted depends on that row alone.
    """
    if not cpu_fast_paths or logits.shape[-1] <= FAST_PATH_CANDIDATES:
        return apply_top_p_sorted(logits, top_p)
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    top_probs = probs.topk(FAST_PATH_CANDIDATES, dim=-1).values  # [num_rows, FAST_PATH_CANDIDATES]
    threshold, is_decided = nucleus_threshold(top_probs, top_p)
    undecided = (~is_decided).nonzero().squeeze(1)  # [num_undecided]: nucleus wider than the top tokens
    if undecided.numel() > 0:
        sorted_probs = probs[undecided].sort(dim=-1, descending=True).values  # [num_undecided, vocab]
        threshold[undecided] = nucleus_threshold(sorted_probs, top_p[undecided])[0]
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p by sorting the vocabulary: keep the most likely tokens until they hold top_p. No host sync."""
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    threshold, _ = nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p)
    return logits.masked_fill_(probs < threshold, float("-inf"))


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
    threshold, _ = nucleus_threshold(probs, top_p)  # the top-k hold all the mass: always decided
    values.masked_fill_(probs < threshold, float("-inf"))
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
