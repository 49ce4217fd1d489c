"""Async scheduling end to end: the engine schedules and launches each decode step before reading the
previous step's tokens, and every output must be the one the synchronous loop gives.

On CPU nothing overlaps (the forward pass runs as it is launched), but the bookkeeping is the one CUDA
uses: early steps take their input tokens from the previous step's sampled ids on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.outputs import SchedulerOutput

PROMPTS = [f"Prompt number {i}: " + "word " * (3 * i) for i in range(8)]


def generate(
    model: Path, params: list[SamplingParams], async_scheduling: bool, max_num_seqs: int = 8
) -> tuple[list[object], int]:
    llm = LLM(
        str(model),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=max_num_seqs,
        async_scheduling=async_scheduling,
    )
    core = llm.engine.core
    early_steps = []
    schedule_after = core.scheduler.schedule_after

    def counting(previous: SchedulerOutput) -> SchedulerOutput | None:
        following = schedule_after(previous)
        early_steps.extend([following] if following is not None else [])
        return following

    core.scheduler.schedule_after = counting  # type: ignore[method-assign]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert core._launched is None and not core.has_unfinished_requests()
    kv = core.scheduler.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks
    results = [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.text, c.logprobs) for c in output.outputs]
        for output in outputs
    ]
    return results, len(early_steps)


@pytest.mark.parametrize("max_num_seqs", [8, 3])  # 3: requests wait for seats
def test_async_scheduling_keeps_every_output(
    tiny_model_dir: Callable[[str], Path], max_num_seqs: int, smollm2_tokenizer: Any
) -> None:
    model = tiny_model_dir("llama")
    greedy = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * len(PROMPTS)
    probe, _ = generate(model, greedy, async_scheduling=False)
    token_at = lambda i, position: probe[i][0][0][position]  # noqa: E731  (prompt i's greedy token)
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=1, max_tokens=20, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=4, top_k=20, n=2, max_tokens=12, ignore_eos=True),
        # min_tokens masks the stop token until the 10th output token: its boundary must be exact
        SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop_token_ids=[token_at(3, 2)]),
        # this prompt's greedy output repeats its tokens: the penalty must see the latest one
        SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[token_at(5, 6)]),  # stops mid-batch
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.5, seed=7, max_tokens=40, ignore_eos=True),
    ]
    # A bad word of the greedy output's tokens 2-3: its last token is banned right after the first.
    params[6].bad_words = [smollm2_tokenizer.decode([token_at(6, 2), token_at(6, 3)])]
    expected, _ = generate(model, params, async_scheduling=False, max_num_seqs=max_num_seqs)
    actual, num_early = generate(model, params, async_scheduling=True, max_num_seqs=max_num_seqs)
    assert actual == expected
    assert expected[5][0][1] == "stop" and len(expected[5][0][0]) <= 7
    assert num_early > 15  # the steady decoding between admissions and finishes ran early


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--async-scheduling"], True)])
def test_async_scheduling_flag(flag: list[str], expected: bool | None) -> None:
    from tokenmill.entrypoints.cli_args import make_serve_parser

    args = make_serve_parser().parse_args(["model", *flag])
    assert args.async_scheduling is expected
