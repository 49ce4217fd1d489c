"""The contracts between the engine's parts.

    EngineCoreRequest  --(frontend -> core)-->  Scheduler  --SchedulerOutput-->  ModelRunner
    ModelRunnerOutput  --(runner -> scheduler)-->  EngineCoreOutput  --(core -> frontend)-->  RequestOutput

The core speaks token ids only; the frontend (offline `LLM` or the API server) tokenizes, detokenizes,
matches stop strings and builds `RequestOutput`s. Everything that crosses the core's process boundary is
a plain picklable dataclass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.engine.request import Request
    from tokenmill.sampling_params import SamplingParams


class FinishReason(StrEnum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


# --- frontend -> core -----------------------------------------------------------------------------


@dataclass
class EngineCoreRequest:
    """One sequence to generate (a request with n > 1 arrives as n of these, sharing the prompt)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    group_id: str | None = None
    """The request id shared by the n sequences of one request (n > 1): they share the prompt's blocks
    even with prefix caching off."""


# --- scheduler -> runner ---------------------------------------------------------------------------


@dataclass
class ScheduledRequest:
    """A request's share of one step: `num_new_tokens` tokens starting at position `num_computed_tokens`."""

    request: Request
    num_computed_tokens: int  # tokens already in the KV cache before this step
    num_new_tokens: int
    block_ids: list[int]
    samples: bool  # this step reaches the end of the known tokens, so the next token is sampled

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        start = self.num_computed_tokens
        return self.request.all_token_ids[start : start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    """What one engine step computes, in batch order."""

    scheduled: list[ScheduledRequest]
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last step: drop their state
    # Async scheduling: this step was scheduled before the previous step's sampled tokens were read. Each
    # scheduled request decodes the token the previous step samples for it, in row previous_rows[i] of
    # that step's sampled ids (still on the device); its token_ids are not known yet.
    previous_rows: list[int] | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# --- runner -> scheduler ---------------------------------------------------------------------------


@dataclass
class LogprobsLists:
    """Logprobs of some positions: row i holds the chosen token first, then the top-k, by logprob."""

    token_ids: list[list[int]]  # [num_positions][1 + k]
    logprobs: list[list[float]]  # [num_positions][1 + k]
    ranks: list[int]  # [num_positions] rank of the chosen token (1 = most likely)

    def slice(self, start: int, end: int) -> LogprobsLists:
        return LogprobsLists(self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end])


@dataclass
class ModelRunnerOutput:
    """The runner's result for one step, keyed by request id."""

    sampled_token_ids: dict[str, int]  # only requests whose step sampled
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)  # one row for the sampled token
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)  # rows for this step's chunk


# --- core -> frontend ------------------------------------------------------------------------------


@dataclass
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# --- frontend -> user ------------------------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token and the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]  # the first prompt token has none


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """vLLM-compatible result of one request (all its n completions)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
