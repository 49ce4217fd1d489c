"""Scheduler + KV cache driven by a fake runner whose next token is a function of the whole context."""

from collections.abc import Iterator

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.outputs import EngineCoreRequest, FinishReason, ModelRunnerOutput, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def fake_runner(output: SchedulerOutput) -> ModelRunnerOutput:
    sampled = {}
    for s in output.scheduled:
        if s.samples:
            context = s.request.all_token_ids[: s.num_computed_tokens + s.num_new_tokens]
            sampled[s.request_id] = (sum(t * (i + 1) for i, t in enumerate(context)) * 31 + 7) % 1000
    return ModelRunnerOutput(sampled)


def make_scheduler(
    num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16, chunk: int = 0, **cache: object
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, long_prefill_token_threshold=chunk
        ),
        CacheConfig(block_size=BLOCK, **cache),  # type: ignore[arg-type]
        num_blocks=num_blocks,
        max_model_len=256,
    )


@pytest.fixture
def check_pool_free() -> Iterator[list[Scheduler]]:
    schedulers: list[Scheduler] = []
    yield schedulers
    for scheduler in schedulers:
        assert not scheduler.has_unfinished_requests()
        assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.pool.num_blocks
        assert all(b.ref_cnt == 0 for b in scheduler.kv_cache.pool.blocks)


def add(scheduler: Scheduler, request_id: str, tokens: list[int], max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    request = Request(EngineCoreRequest(request_id, tokens, params))
    scheduler.add_request(request)
    return request


def run(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps = []
    while scheduler.has_unfinished_requests() and len(steps) < max_steps:
        output = scheduler.schedule()
        scheduler.update_from_output(output, fake_runner(output))
        steps.append(output)
    assert not scheduler.has_unfinished_requests(), "scheduler made no progress"
    return steps


def test_requests_finish_with_max_tokens(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    requests = [add(scheduler, f"r{i}", list(range(i, i + 5 + i)), max_tokens=3 + i) for i in range(4)]
    run(scheduler)
    for i, r in enumerate(requests):
        assert r.num_output_tokens == 3 + i
        assert r.finish_reason == FinishReason.LENGTH


def test_decodes_and_prefills_share_a_step(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    add(scheduler, "a", list(range(6)))
    first = scheduler.schedule()
    scheduler.update_from_output(first, fake_runner(first))
    add(scheduler, "b", list(range(100, 110)))
    second = scheduler.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in second.scheduled] == [("a", 1), ("b", 10)]
    scheduler.update_from_output(second, fake_runner(second))
    run(scheduler)


def test_long_prompt_is_chunked_within_the_budget(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler(budget=8)
    check_pool_free.append(scheduler)
    add(scheduler, "long", list(range(20)), max_tokens=2)
    steps = run(scheduler)
    chunks = [s.scheduled[0].num_new_tokens for s in steps]
    assert chunks == [8, 8, 4, 1]
    assert [s.scheduled[0].samples for s in steps] == [False, False, True, True]


def test_chunked_prefill_gives_the_same_tokens(check_pool_free: list[Scheduler]) -> None:
    outputs = []
    for budget in (64, 3):
        scheduler = make_scheduler(budget=budget)
        check_pool_free.append(scheduler)
        request = add(scheduler, "r", list(range(30)), max_tokens=6)
        run(scheduler)
        outputs.append(request.output_token_ids)
    assert outputs[0] == outputs[1]


def test_shared_prefix_computes_only_new_tokens(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    prefix = list(range(50, 62))  # three full blocks
    add(scheduler, "first", prefix + [1, 2])
    run(scheduler)
    second = add(scheduler, "second", prefix + [3, 4, 5])
    step = scheduler.schedule()
    assert step.scheduled[0].num_computed_tokens == 12
    assert step.scheduled[0].num_new_tokens == 3
    scheduler.update_from_output(step, fake_runner(step))
    run(scheduler)
    assert second.num_cached_tokens == 12
    stats = scheduler.get_stats()
    assert stats.prefix_cache_hits == 12 and stats.prefix_cache_queries == 14 + 15


def test_preemption_and_resume_give_the_same_output(check_pool_free: list[Scheduler]) -> None:
    prompts = {f"r{i}": list(range(10 * i, 10 * i + 7)) for i in range(3)}
    roomy = make_scheduler(num_blocks=64)
    tight = make_scheduler(num_blocks=9)  # 3 requests x (7 prompt + 12 output) tokens need 15 blocks
    check_pool_free.extend([roomy, tight])
    results = {}
    for scheduler in (roomy, tight):
        requests = {rid: add(scheduler, rid, tokens, max_tokens=12) for rid, tokens in prompts.items()}
        steps = run(scheduler)
        results[scheduler] = ({rid: r.output_token_ids for rid, r in requests.items()}, steps)
    assert results[tight][0] == results[roomy][0]
    assert any(s.preempted_request_ids for s in results[tight][1])
    assert tight.num_preemptions > 0 and roomy.num_preemptions == 0


def test_abort_at_any_point_frees_everything(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler(budget=10, chunk=6)
    check_pool_free.append(scheduler)
    mid_prefill = add(scheduler, "mid-prefill", list(range(40)))
    step = scheduler.schedule()
    scheduler.update_from_output(step, fake_runner(step))
    waiting = add(scheduler, "waiting", list(range(100, 130)))
    scheduler.finish_requests(["waiting"], RequestStatus.FINISHED_ABORTED)
    assert waiting.status == RequestStatus.FINISHED_ABORTED and not scheduler.waiting
    decoding = add(scheduler, "decoding", [1, 2, 3])
    finished_ids = []
    for _ in range(3):
        step = scheduler.schedule()
        finished_ids += step.finished_request_ids
        scheduler.update_from_output(step, fake_runner(step))
    assert decoding.num_output_tokens > 0 and mid_prefill.num_output_tokens == 0
    scheduler.finish_requests(["mid-prefill", "decoding", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert mid_prefill.is_finished and decoding.is_finished
    finished_ids += scheduler.schedule().finished_request_ids  # the runner is told to drop their state
    assert sorted(finished_ids) == ["decoding", "mid-prefill", "waiting"]


def test_abort_between_schedule_and_update(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    request = add(scheduler, "r", list(range(5)))
    step = scheduler.schedule()
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(step, fake_runner(step)) == []
    assert request.num_output_tokens == 0


def test_max_num_seqs_limits_the_batch(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    check_pool_free.append(scheduler)
    for i in range(5):
        add(scheduler, f"r{i}", [i, i + 1, i + 2], max_tokens=2)
    steps = run(scheduler)
    assert max(len(s.scheduled) for s in steps) == 2


def test_eos_stops_unless_ignored_and_min_tokens_holds() -> None:
    scheduler = make_scheduler()
    params = SamplingParams(max_tokens=10, min_tokens=2, eos_token_ids=frozenset({5}))
    request = Request(EngineCoreRequest("r", [1, 2], params))
    scheduler.add_request(request)
    for token in (5, 5, 5):  # min_tokens=2: the third eos ends it
        step = scheduler.schedule()
        outputs = scheduler.update_from_output(step, ModelRunnerOutput({"r": token}))
    assert outputs[0].finish_reason == FinishReason.STOP and outputs[0].stop_reason is None
    assert request.output_token_ids == [5, 5, 5]


def test_stop_token_id_is_reported_as_stop_reason() -> None:
    scheduler = make_scheduler()
    params = SamplingParams(max_tokens=10, stop_token_ids=[42], ignore_eos=True)
    scheduler.add_request(Request(EngineCoreRequest("r", [1, 2], params)))
    step = scheduler.schedule()
    (output,) = scheduler.update_from_output(step, ModelRunnerOutput({"r": 42}))
    assert output.finish_reason == FinishReason.STOP and output.stop_reason == 42
