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
    # Every prompt token counts once, cached ones too (vLLM's vllm:prompt_tokens_total).
    assert stats.num_prompt_tokens == 14 + 15


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_n_sequences_compute_their_prompt_once(
    check_pool_free: list[Scheduler], enable_prefix_caching: bool
) -> None:
    scheduler = make_scheduler(enable_prefix_caching=enable_prefix_caching)
    check_pool_free.append(scheduler)
    prompt = list(range(100, 121))  # five full blocks and one token
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    for i in range(4):
        scheduler.add_request(Request(EngineCoreRequest(f"{i}_req", prompt, params, group_id="req")))
    steps = run(scheduler)
    prefill = sum(s.num_new_tokens for step in steps for s in step.scheduled if s.num_computed_tokens < 21)
    assert prefill == 21 + 3 * 1  # the first child computes the prompt, the others its last token only


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
    # Recomputing a preempted prompt does not count it again.
    assert tight.get_stats().num_prompt_tokens == roomy.get_stats().num_prompt_tokens == 3 * 7


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


# --- async scheduling: the next step scheduled before the previous one's tokens are applied ----------


def run_async(scheduler: Scheduler, max_steps: int = 1000) -> tuple[list[SchedulerOutput], int]:
    """The engine's async loop with the fake runner: each launched step's follower is scheduled before
    the step's tokens are applied. (The fake runner runs a step when its tokens are applied, which gives
    what a device would: its inputs are known by then.) Returns the steps and how many were early."""
    steps: list[SchedulerOutput] = []
    launched: SchedulerOutput | None = None
    num_early = 0
    while (launched is not None or scheduler.has_unfinished_requests()) and len(steps) < max_steps:
        if launched is None:
            launched = scheduler.schedule()
        following = scheduler.schedule_after(launched)
        scheduler.update_from_output(launched, fake_runner(launched))
        steps.append(launched)
        num_early += following is not None
        launched = following
    assert not scheduler.has_unfinished_requests(), "scheduler made no progress"
    return steps, num_early


def mixed_requests(scheduler: Scheduler) -> list[Request]:
    requests = [add(scheduler, f"r{i}", list(range(i, 3 + 3 * i)), max_tokens=4 + 3 * i) for i in range(6)]
    stopping = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=list(range(0, 1000, 9)))
    penalised = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, presence_penalty=0.5)
    late_min = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, min_tokens=9)
    for request_id, params in (("stops", stopping), ("penalised", penalised), ("min", late_min)):
        request = Request(EngineCoreRequest(request_id, [5, 6, 7, 8, 9], params))
        scheduler.add_request(request)
        requests.append(request)
    return requests


@pytest.mark.parametrize("max_num_seqs", [16, 3])  # 3: requests wait for seats
def test_async_schedule_gives_the_same_tokens(check_pool_free: list[Scheduler], max_num_seqs: int) -> None:
    sync_scheduler, async_scheduler = (make_scheduler(max_num_seqs=max_num_seqs, chunk=4) for _ in range(2))
    check_pool_free.extend([sync_scheduler, async_scheduler])
    expected, actual = mixed_requests(sync_scheduler), mixed_requests(async_scheduler)
    run(sync_scheduler)
    steps, num_early = run_async(async_scheduler)
    assert [r.output_token_ids for r in actual] == [r.output_token_ids for r in expected]
    assert [r.finish_reason for r in actual] == [r.finish_reason for r in expected]
    assert num_early > len(steps) // 3  # steady decoding was scheduled early
    for step in steps:
        if step.previous_rows is not None:
            assert all(s.num_new_tokens == 1 and s.samples for s in step.scheduled)


def test_early_step_decodes_previous_rows_and_skips_a_length_finish(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    short = add(scheduler, "short", [1, 2, 3], max_tokens=2)
    long = add(scheduler, "long", [4, 5], max_tokens=9)
    first = scheduler.schedule()  # both prompts, each samples its first token
    second = scheduler.schedule_after(first)
    assert second is not None and second.previous_rows == [0, 1]
    assert [(s.num_computed_tokens, s.num_new_tokens) for s in second.scheduled] == [(3, 1), (2, 1)]
    assert all(len(s.block_ids) * BLOCK >= s.num_computed_tokens + 1 for s in second.scheduled)
    scheduler.update_from_output(first, fake_runner(first))
    third = scheduler.schedule_after(second)  # short's second token (from `second`) is its last
    assert third is not None and [s.request for s in third.scheduled] == [long] and third.previous_rows == [1]
    scheduler.update_from_output(second, fake_runner(second))
    assert short.finish_reason == FinishReason.LENGTH and short.num_output_tokens == 2
    scheduler.update_from_output(third, fake_runner(third))
    run(scheduler)


def test_no_early_step_while_a_waiting_request_can_be_admitted_or_a_prompt_is_chunked(
    check_pool_free: list[Scheduler],
) -> None:
    scheduler = make_scheduler(budget=6)
    check_pool_free.append(scheduler)
    add(scheduler, "a", [1, 2, 3])
    add(scheduler, "b", list(range(10, 20)))  # 10 tokens: its prefill takes two steps of the budget
    first = scheduler.schedule()
    assert [s.samples for s in first.scheduled] == [True, False]
    assert scheduler.schedule_after(first) is None  # b's prompt is mid-prefill
    scheduler.update_from_output(first, fake_runner(first))
    add(scheduler, "c", [7, 8])
    second = scheduler.schedule()
    assert scheduler.schedule_after(second) is None  # c is admitted as a seat is free
    scheduler.update_from_output(second, fake_runner(second))
    run(scheduler)


def test_abort_while_an_early_step_is_in_flight_frees_everything(check_pool_free: list[Scheduler]) -> None:
    scheduler = make_scheduler()
    check_pool_free.append(scheduler)
    kept = add(scheduler, "kept", [1, 2, 3, 4], max_tokens=6)
    aborted = add(scheduler, "gone", [5, 6], max_tokens=6)
    first = scheduler.schedule()
    second = scheduler.schedule_after(first)
    assert second is not None
    scheduler.finish_requests(["gone"], RequestStatus.FINISHED_ABORTED)
    outputs = scheduler.update_from_output(first, fake_runner(first))
    outputs += scheduler.update_from_output(second, fake_runner(second))
    assert {o.request_id for o in outputs} == {"kept"} and aborted.num_output_tokens == 0
    assert kept.num_output_tokens == 2
    assert scheduler.schedule_after(second) is None  # the running set changed: back to schedule()
    run(scheduler)
