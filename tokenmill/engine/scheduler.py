"""Token-budget continuous batching (vLLM v1 style): no prefill/decode phases, one budget per step.

Each step first advances running requests (a decode token, or the next chunk of a long prefill), then
admits waiting requests FCFS while the token budget, `max_num_seqs` and free KV blocks allow. When blocks
run out the newest running request is preempted: its blocks are freed and it is recomputed later (its
prefix blocks are usually still in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.outputs import (
    EngineCoreOutput,
    LogprobsLists,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.sample.penalties import has_penalties


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int, max_model_len: int
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.kv_cache = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_ids: list[str] = []  # since the last schedule, for the runner to drop their state
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.token_budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        finished, self.finished_ids = self.finished_ids, []
        return SchedulerOutput(scheduled, [r.request_id for r in preempted], finished)

    def schedule_after(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `previous`, scheduled before `previous`'s sampled tokens are read (async
        scheduling: the host prepares step N+1 while the device runs step N).

        Only for steady decoding: `previous` ran every running request and each sampled, no waiting
        request could be admitted, and no request's sampling reads its own output tokens (penalties, a
        min_tokens boundary), which are one token behind until `previous` is applied. Each request
        decodes the token `previous` samples for it, except those that token ends by length. None when
        that is not the step `schedule` would choose, or blocks run out: the caller then applies
        `previous` and calls `schedule`.
        """
        if [s.request for s in previous.scheduled] != self.running:
            return None  # a request finished or was aborted, or the budget left one out
        admits = bool(self.waiting) and len(self.running) < self.config.max_num_seqs
        if admits or len(self.running) > self.config.token_budget:
            return None
        scheduled: list[ScheduledRequest] = []
        rows: list[int] = []
        for row, prior in enumerate(previous.scheduled):
            request = prior.request
            if not prior.samples or not _samples_without_own_outputs(request):
                return None
            if self._at_length_limit(request, pending=1):  # previous's token is its last
                if self.waiting:
                    return None  # its seat goes to a waiting request at the next step
                continue
            # Blocks for previous's tokens and the one sampled now; known tokens' full blocks are hashed.
            if not self.kv_cache.allocate_slots(request, prior.num_new_tokens + 1):
                return None
            num_computed = prior.num_computed_tokens + prior.num_new_tokens
            scheduled.append(ScheduledRequest(request, num_computed, 1, list(request.block_ids), True))
            rows.append(row)
        if not scheduled:
            return None
        finished, self.finished_ids = self.finished_ids, []
        return SchedulerOutput(scheduled, [], finished, previous_rows=rows)

    def _at_length_limit(self, request: Request, pending: int = 0) -> bool:
        """Whether the request has reached max_tokens or max_model_len, counting `pending` sampled tokens
        not appended yet."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens + pending >= max_tokens:
            return True
        return request.num_tokens + pending >= self.max_model_len

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = min(request.num_tokens - num_computed, budget)
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Allocates blocks for a running request, preempting the newest running ones until it fits."""
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    @staticmethod
    def _scheduled(request: Request, num_new: int) -> ScheduledRequest:
        samples = request.num_computed_tokens + num_new == request.num_tokens
        return ScheduledRequest(
            request, request.num_computed_tokens, num_new, list(request.block_ids), samples
        )

    # --- results --------------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        results = []
        for scheduled in scheduler_output.scheduled:
            request = scheduled.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += scheduled.num_new_tokens
            prompt_logprobs = self._new_prompt_logprobs(scheduled, output.prompt_logprobs)
            token_id = output.sampled_token_ids.get(request.request_id)
            new_token_ids = []
            if token_id is not None and not request.output_token_ids:
                # As vLLM counts them: every prompt token once, at the first output, cached ones included.
                self.num_prompt_tokens += request.num_prompt_tokens
            if token_id is not None:
                request.append_output_token(token_id)
                new_token_ids.append(token_id)
                self.num_generation_tokens += 1
                self._check_stop(request, token_id)
            if new_token_ids or prompt_logprobs is not None or request.is_finished:
                results.append(
                    EngineCoreOutput(
                        request.request_id,
                        new_token_ids,
                        new_logprobs=output.logprobs.get(request.request_id),
                        new_prompt_logprobs=prompt_logprobs,
                        finish_reason=request.finish_reason,
                        stop_reason=request.stop_reason,
                        num_cached_tokens=request.num_cached_tokens,
                    )
                )
            if request.is_finished:
                self._free(request)
        return results

    @staticmethod
    def _new_prompt_logprobs(
        scheduled: ScheduledRequest, prompt_logprobs: dict[str, LogprobsLists]
    ) -> LogprobsLists | None:
        """The chunk's prompt logprobs without the positions sent before a preemption (recomputed)."""
        request = scheduled.request
        lists = prompt_logprobs.get(request.request_id)
        if lists is None:
            return None
        num_sent_here = request.num_prompt_logprobs_sent - scheduled.num_computed_tokens
        end = scheduled.num_computed_tokens + len(lists.token_ids)
        request.num_prompt_logprobs_sent = max(request.num_prompt_logprobs_sent, end)
        return lists if num_sent_here <= 0 else lists.slice(num_sent_here, len(lists.token_ids))

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens > params.min_tokens and token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            if token_id not in params.eos_token_ids or params.ignore_eos:
                request.stop_reason = token_id
        elif self._at_length_limit(request):
            request.status = RequestStatus.FINISHED_LENGTH

    # --- aborts and cleanup -----------------------------------------------------------------------

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Ends requests at any point (abort, or a stop string the frontend found); frees their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request not in self.running:
                self.waiting.remove(request)
            request.status = status
            self._free(request)

    def _free(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        self.finished_ids.append(request.request_id)

    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            num_total_blocks=kv.pool.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
        )


def _samples_without_own_outputs(request: Request) -> bool:
    """Whether the request's next sampling ignores its output tokens so far (they lag a step when the step
    is scheduled early): no penalties, no bad word of several tokens, and min_tokens is not crossed by the
    token in flight."""
    params, num_output = request.sampling_params, request.num_output_tokens
    multi_token_bad_word = any(len(word) > 1 for word in params.bad_words_token_ids)
    return (
        not has_penalties(params)
        and not multi_token_bad_word
        and not num_output < params.min_tokens <= num_output + 1
    )
