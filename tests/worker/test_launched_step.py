"""worker/launched_step.py on the CPU: a launched step's results read back per request (on CUDA the
same objects travel through pinned memory and an event; gpu_check's sync row checks that path)."""

import torch

from tokenmill.engine.outputs import EngineCoreRequest, ModelRunnerOutput, ScheduledRequest
from tokenmill.engine.request import Request
from tokenmill.sample.logprobs import LogprobsTensors
from tokenmill.sample.sampler import SamplerOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.launched_step import LaunchedStep, PromptLogprobsResults, SampledResults


def scheduled(request_id: str, **params: object) -> ScheduledRequest:
    core_request = EngineCoreRequest(request_id, [1, 2, 3], SamplingParams(**params))  # type: ignore[arg-type]
    return ScheduledRequest(Request(core_request), 0, 3, [0], samples=True)


def logprobs_of(rows: list[tuple[int, float]]) -> LogprobsTensors:
    """One logprob per row (k = 0): the chosen token and its logprob, rank 1."""
    return LogprobsTensors(
        token_ids=torch.tensor([[token] for token, _ in rows]),
        logprobs=torch.tensor([[value] for _, value in rows]),
        ranks=torch.ones(len(rows), dtype=torch.int64),
    )


def test_sampled_tokens_and_logprobs_go_to_their_requests_only_where_asked() -> None:
    rows = [scheduled("a", logprobs=0), scheduled("b")]
    sampled = SamplerOutput(torch.tensor([7, 9]), logprobs_of([(7, -0.5), (9, -1.5)]))
    results = SampledResults.copy_to_host(sampled)
    assert results.arrived is None  # off CUDA: the tensors themselves, nothing to wait for
    output = LaunchedStep(rows, sampled, results, ModelRunnerOutput({})).output()
    assert output.sampled_token_ids == {"a": 7, "b": 9}
    assert list(output.logprobs) == ["a"]
    assert output.logprobs["a"].token_ids == [[7]] and output.logprobs["a"].logprobs == [[-0.5]]


def test_prompt_logprobs_of_a_chunk_without_any_are_empty_and_not_shared() -> None:
    chunk = logprobs_of([(2, -0.25), (3, -0.75)])
    prompt_logprobs = PromptLogprobsResults.copy_to_host({"a": chunk, "b": None, "c": None})
    output = LaunchedStep([], None, None, ModelRunnerOutput({}), prompt_logprobs).output()
    assert output.prompt_logprobs["a"].token_ids == [[2], [3]]
    assert output.prompt_logprobs["b"].token_ids == [] and output.prompt_logprobs["c"].ranks == []
    output.prompt_logprobs["b"].token_ids.append([0])  # the caller extends them chunk by chunk
    assert output.prompt_logprobs["c"].token_ids == []
