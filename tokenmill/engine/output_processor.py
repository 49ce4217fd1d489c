"""Frontend output side: core outputs -> detokenized, stop-string-checked `RequestOutput`s.

A request with n > 1 runs in the core as n child sequences; their outputs are merged here into one
`RequestOutput` whose `outputs[i].index` says which completion each is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    FinishReason,
    LogprobsLists,
    PromptLogprobs,
    RequestOutput,
    SampleLogprobs,
)
from tokenmill.engine.processor import ProcessedRequest
from tokenmill.sample.logprobs import to_sample_logprobs
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class SequenceState:
    """One completion's progress as the frontend sees it."""

    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # for DELTA outputs
    num_sent_logprobs: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: dict[str, SequenceState]  # child id -> state
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    updated: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.parent_of: dict[str, str] = {}  # child id -> request id

    def add_request(self, processed: ProcessedRequest, request_id: str, params: SamplingParams) -> None:
        wants_logprobs = params.logprobs is not None
        sequences = {
            core.request_id: SequenceState(
                index=i,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, processed.prompt_token_ids, core.sampling_params
                ),
                logprobs=[] if wants_logprobs else None,
                cumulative_logprob=0.0 if wants_logprobs else None,
            )
            for i, core in enumerate(processed.core_requests)
        }
        prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.requests[request_id] = RequestState(
            request_id, processed.prompt, processed.prompt_token_ids, params, sequences, prompt_logprobs
        )
        self.parent_of.update((child_id, request_id) for child_id in sequences)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> list[str]:
        """Forgets a request; returns the child ids the core must abort."""
        if request_id not in self.requests:
            return []
        state = self._forget(request_id)
        return [c for c, s in state.sequences.items() if not s.finished]

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to deliver and the child ids to abort (stop strings matched)."""
        to_abort: list[str] = []
        touched: dict[str, RequestState] = {}
        for output in outputs:
            request_id = self.parent_of.get(output.request_id)
            if request_id is None:
                continue  # aborted meanwhile
            state = self.requests[request_id]
            if self._update_sequence(state, output):
                to_abort.append(output.request_id)
            touched[request_id] = state
        results = []
        for request_id, state in touched.items():
            request_output = self._make_output(state)
            if request_output is not None:
                results.append(request_output)
            if state.finished:
                self._forget(request_id)
        return results, to_abort

    def _update_sequence(self, state: RequestState, output: EngineCoreOutput) -> bool:
        """Applies one core output; True if a stop string ended the sequence (the core must abort it)."""
        seq = state.sequences[output.request_id]
        state.updated.add(output.request_id)
        state.num_cached_tokens = output.num_cached_tokens
        # Every child of an n > 1 request computes the shared prompt's logprobs; the first one's are kept.
        if output.new_prompt_logprobs is not None and state.prompt_logprobs is not None and seq.index == 0:
            self._append_prompt_logprobs(state, output.new_prompt_logprobs)
        if seq.finished:
            return False
        if output.new_logprobs is not None and seq.logprobs is not None:
            self._append_logprobs(seq, output.new_logprobs, state.params.logprobs or 0)
        stop_terminated = output.finish_reason == FinishReason.STOP
        stop_string = seq.detokenizer.update(output.new_token_ids, stop_terminated, output.finished)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP.value, stop_string
            return not output.finished
        if output.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = output.finish_reason.value, output.stop_reason
        return False

    def _append_logprobs(self, seq: SequenceState, lists: LogprobsLists, num_top: int) -> None:
        rows = to_sample_logprobs(lists, self.tokenizer, num_top)
        assert seq.logprobs is not None and seq.cumulative_logprob is not None
        seq.logprobs.extend(rows)
        seq.cumulative_logprob += sum(row_lists[0] for row_lists in lists.logprobs)

    def _append_prompt_logprobs(self, state: RequestState, lists: LogprobsLists) -> None:
        assert state.prompt_logprobs is not None
        if lists.token_ids:
            state.prompt_logprobs.extend(
                to_sample_logprobs(lists, self.tokenizer, state.params.prompt_logprobs or 0)
            )

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        chosen = [c for c in state.sequences if c in state.updated] if delta else list(state.sequences)
        state.updated.clear()
        completions = [self._completion(state.sequences[c], delta) for c in chosen]
        completions.sort(key=lambda c: c.index)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
        )

    @staticmethod
    def _completion(seq: SequenceState, delta: bool) -> CompletionOutput:
        detok = seq.detokenizer
        text = detok.get_next_output_text(seq.finished, delta)
        token_ids, logprobs = list(detok.token_ids), seq.logprobs
        if delta:
            token_ids = token_ids[seq.num_sent_tokens :]
            seq.num_sent_tokens = len(detok.token_ids)
            if logprobs is not None:
                logprobs = logprobs[seq.num_sent_logprobs :]
                seq.num_sent_logprobs = len(seq.logprobs or [])
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _forget(self, request_id: str) -> RequestState:
        state = self.requests.pop(request_id)
        for child_id in state.sequences:
            self.parent_of.pop(child_id, None)
        return state
