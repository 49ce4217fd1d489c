"""A step queued on the device, and its results on their way to the host.

On CUDA, what a step produces (sampled ids, logprobs, prompt logprobs) is copied into pinned host memory
right behind it and an event marks its arrival, so the host can launch the next step before reading
this one's results (async scheduling). Elsewhere the results are the tensors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import LogprobsLists, ModelRunnerOutput, ScheduledRequest
from tokenmill.sample.logprobs import LogprobsTensors, unpack_logprobs
from tokenmill.sample.sampler import SamplerOutput


@dataclass
class SampledResults:
    """A step's sampled ids and packed logprobs on their way to the host.

    On CUDA they are copied into pinned memory right behind the sampler, ahead of whatever is launched
    next, and an event marks their arrival: reading them waits for this step only, not for the step
    launched behind it (a plain .cpu() would queue behind that one). Elsewhere they are the tensors.
    """

    token_ids: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None  # LogprobsTensors.packed(); None when no row wants logprobs
    arrived: torch.cuda.Event | None

    @classmethod
    def copy_to_host(cls, sampled: SamplerOutput) -> SampledResults:
        logprobs = None if sampled.logprobs is None else sampled.logprobs.packed()
        (token_ids, logprobs), arrived = _copies_on_their_way([sampled.sampled_token_ids, logprobs])
        assert token_ids is not None
        return cls(token_ids, logprobs, arrived)

    def wait(self) -> tuple[list[int], LogprobsLists | None]:
        if self.arrived is not None:
            self.arrived.synchronize()
        logprobs = None if self.logprobs is None else unpack_logprobs(self.logprobs.cpu())
        return self.token_ids.tolist(), logprobs


@dataclass
class PromptLogprobsResults:
    """A step's prompt logprobs on their way to the host, per request id (None: none in this chunk), as
    `SampledResults` takes the sampled tokens: reading them waits for this step only."""

    packed: dict[str, torch.Tensor | None]  # LogprobsTensors.packed()
    arrived: torch.cuda.Event | None

    @classmethod
    def copy_to_host(cls, tensors: dict[str, LogprobsTensors | None]) -> PromptLogprobsResults:
        packed = [None if t is None else t.packed() for t in tensors.values()]
        host, arrived = _copies_on_their_way(packed)
        return cls(dict(zip(tensors, host, strict=True)), arrived)

    def wait(self) -> dict[str, LogprobsLists]:
        if self.arrived is not None:
            self.arrived.synchronize()
        return {
            request_id: LogprobsLists([], [], []) if t is None else unpack_logprobs(t)
            for request_id, t in self.packed.items()
        }


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampling rows, their sampled tokens (still on the device, for a
    step that decodes them before they are read), and their copy and the prompt logprobs' to the host."""

    rows: list[ScheduledRequest]  # the sequences that sampled, in the order of `sampled`
    sampled: SamplerOutput | None
    results: SampledResults | None
    partial: ModelRunnerOutput
    prompt_logprobs: PromptLogprobsResults | None = None

    def output(self) -> ModelRunnerOutput:
        """The step's results on the host (waits for this step's device work)."""
        out = self.partial
        if self.prompt_logprobs is not None:
            out.prompt_logprobs.update(self.prompt_logprobs.wait())
        if self.results is None:
            return out
        token_ids, logprobs = self.results.wait()
        for row, (r, token_id) in enumerate(zip(self.rows, token_ids, strict=True)):
            out.sampled_token_ids[r.request_id] = token_id
            if logprobs is not None and r.request.sampling_params.logprobs is not None:
                out.logprobs[r.request_id] = logprobs.slice(row, row + 1)
        return out


def _copies_on_their_way(
    tensors: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor | None], torch.cuda.Event | None]:
    """CUDA `tensors` copied into pinned host memory, queued on the current stream (not waited for), and
    an event that marks their arrival; off CUDA, the tensors themselves and no event."""
    if not any(t is not None and t.device.type == "cuda" for t in tensors):
        return tensors, None
    host = [None if t is None else _to_pinned_host(t) for t in tensors]
    arrived = torch.cuda.Event()
    arrived.record()
    return host, arrived


def _to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of device `tensor` in pinned host memory, queued on the current stream (not waited for)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
