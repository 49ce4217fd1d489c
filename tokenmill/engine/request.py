"""The core's view of one sequence being generated."""

from __future__ import annotations

from enum import Enum, auto

import numpy as np

from tokenmill.engine.outputs import EngineCoreRequest, FinishReason
from tokenmill.sampling_params import SamplingParams


class RequestStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    PREEMPTED = auto()
    FINISHED_STOPPED = auto()
    FINISHED_LENGTH = auto()
    FINISHED_ABORTED = auto()

    @property
    def is_finished(self) -> bool:
        return self.value >= RequestStatus.FINISHED_STOPPED.value


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """Token ids, progress and KV blocks of one sequence; owned by the scheduler."""

    def __init__(self, core_request: EngineCoreRequest) -> None:
        self.request_id = core_request.request_id
        self.group_id = core_request.group_id
        self.prompt_token_ids = list(core_request.prompt_token_ids)
        # For the sampler's penalties: converting a long Python list every step would dominate it.
        self.prompt_token_ids_array = np.asarray(self.prompt_token_ids, dtype=np.int64)
        self.sampling_params: SamplingParams = core_request.sampling_params
        self.arrival_time = core_request.arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.num_prompt_logprobs_sent = (
            0  # prompt positions whose logprobs went out (not again after a preemption)
        )
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the request's full blocks, in order
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
