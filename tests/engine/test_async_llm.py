"""AsyncLLM: per-request streams, aborts on cancel, the bounded queue and a dead core.

The core is replaced by a fake client the test feeds `EngineCoreOutput`s through; one slow test starts
the real core process with a model that does not exist and sees the load error come back; another stops a
core spawned ahead of the server (as `tokenmill serve` does) before anything connected to it, and one
ends the spawning process without stopping the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from tokenmill.config import EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.engine import core_client
from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError, RequestAbortedError
from tokenmill.engine.core_client import CoreFailed, CoreMessage, CoreOutputs, CoreReady, EngineCoreClient
from tokenmill.engine.outputs import EngineCoreOutput, FinishReason
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


class FakeCoreClient:
    def __init__(self, config: EngineConfig, on_message: Callable[[CoreMessage], None]) -> None:
        self.on_message = on_message
        self.added: list[str] = []
        self.aborted: list[str] = []

    def start(self) -> None:
        self.on_message(
            CoreReady(max_model_len=256, vocab_size=49152, stats=SchedulerStats(num_total_blocks=8))
        )

    def add_requests(self, requests: list[Any]) -> None:
        self.added += [r.request_id for r in requests]

    def abort_requests(self, request_ids: list[str]) -> None:
        self.aborted += request_ids

    def shutdown(self) -> None:
        pass


async def started(
    tokenizer: Any, max_num_seqs: int = 4, max_waiting: int = 4
) -> tuple[AsyncLLM, FakeCoreClient]:
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_waiting=max_waiting))
    llm = AsyncLLM(config, tokenizer, frozenset({2}), client_factory=FakeCoreClient)
    await llm.start()
    assert llm.is_ready and llm.max_model_len == 256
    return llm, llm._client


def delta(**kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=8, output_kind=RequestOutputKind.DELTA, **kwargs)


async def wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_generate_streams_until_finished(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        llm, core = await started(smollm2_tokenizer)
        ids = smollm2_tokenizer.encode(" hello world")
        texts: list[str] = []

        async def consume() -> None:
            async for output in llm.generate("Say", delta(), "r1"):
                texts.append(output.outputs[0].text)

        task = asyncio.create_task(consume())
        await wait_for(lambda: core.added == ["0_r1"])
        llm._on_message(CoreOutputs([EngineCoreOutput("0_r1", ids[:1])], SchedulerStats(num_running_reqs=1)))
        llm._on_message(CoreOutputs([EngineCoreOutput("0_r1", ids[1:], finish_reason=FinishReason.LENGTH)]))
        await asyncio.wait_for(task, 10)
        assert "".join(texts) == " hello world" and core.aborted == []
        llm.shutdown()

    asyncio.run(run())


def test_cancelled_consumer_aborts_its_sequences(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        llm, core = await started(smollm2_tokenizer)

        async def consume() -> None:
            async for _ in llm.generate("Say", delta(n=2), "r2"):
                pass

        task = asyncio.create_task(consume())
        await wait_for(lambda: len(core.added) == 2)
        llm._on_message(CoreOutputs([EngineCoreOutput("0_r2", [42])]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(core.aborted) == ["0_r2", "1_r2"]
        llm.shutdown()

    asyncio.run(run())


def test_abort_ends_a_running_generate(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        llm, core = await started(smollm2_tokenizer)
        generator = llm.generate("a", delta(), "r8")
        pending = asyncio.create_task(anext(generator))
        await wait_for(lambda: core.added == ["0_r8"])
        llm.abort("r8")
        with pytest.raises(RequestAbortedError):
            await pending
        assert core.aborted == ["0_r8"]
        llm.shutdown()

    asyncio.run(run())


def test_full_queue_is_refused_and_validation_is_a_value_error(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        llm, core = await started(smollm2_tokenizer, max_num_seqs=1, max_waiting=1)
        with pytest.raises(ValueError, match="maximum context length"):
            await anext(llm.generate("b", SamplingParams(max_tokens=1000), "r5"))
        first = llm.generate("a", delta(n=2), "r3")
        pending = asyncio.create_task(anext(first))
        await wait_for(lambda: len(core.added) == 2)
        with pytest.raises(EngineOverloadedError):
            await anext(llm.generate("b", delta(), "r4"))
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await first.aclose()
        llm.shutdown()

    asyncio.run(run())


def test_dead_core_fails_requests_and_is_reported(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        llm, core = await started(smollm2_tokenizer)
        generator = llm.generate("a", delta(), "r6")
        pending = asyncio.create_task(anext(generator))
        await wait_for(lambda: core.added == ["0_r6"])
        llm._on_message(CoreFailed("the engine core process exited (exit code -9)"))
        with pytest.raises(EngineDeadError, match="exit code -9"):
            await pending
        assert llm.errored and not llm.is_ready
        with pytest.raises(EngineDeadError):
            await anext(llm.generate("b", delta(), "r7"))
        llm.shutdown()

    asyncio.run(run())


@pytest.mark.slow
def test_real_core_process_reports_load_errors(smollm2_tokenizer: Any) -> None:
    async def run() -> None:
        config = EngineConfig(model=ModelConfig(model="/nonexistent/model.gguf"), device="cpu")
        llm = AsyncLLM(config, smollm2_tokenizer, frozenset({2}), client_factory=EngineCoreClient)
        try:
            with pytest.raises(EngineDeadError, match="nonexistent"):
                await asyncio.wait_for(llm.start(), 120)
            assert llm.errored and not llm.is_ready
        finally:
            llm.shutdown()
        assert llm._client._process.exitcode is not None  # no orphan

    asyncio.run(run())


def test_adopted_core_must_have_the_engines_configuration() -> None:
    core = EngineCoreClient(EngineConfig(model=ModelConfig(model="a.gguf"), device="cpu"))
    other = EngineConfig(model=ModelConfig(model="b.gguf"), device="cpu")
    with pytest.raises(ValueError, match="another configuration"):
        core.adopt(other, lambda message: None)
    assert core.adopt(core.config, lambda message: None) is core


@pytest.mark.slow
@pytest.mark.parametrize("connected", [False, True])
def test_a_loading_core_is_stopped_at_once(connected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopped (or failed) while the core loads must not wait out the load: a loading core reads
    no Shutdown. A long grace period would show as a hang here. `connected`: the server had started
    talking to it (Ctrl-C during the load); else it failed first (`tokenmill serve` spawns the core early)."""
    monkeypatch.setattr(core_client, "_SHUTDOWN_GRACE_S", 3600.0)
    core = EngineCoreClient(EngineConfig(device="cpu"))  # the default model: it is loading when stopped
    core.spawn()
    if connected:
        core.adopt(core.config, lambda message: None).start()
        wait_until_torch_is_loading(core._process.pid)
    stopper = threading.Thread(target=core.shutdown, daemon=True)
    stopper.start()
    stopper.join(120)
    assert not stopper.is_alive(), "shutdown waited for the loading core"
    if connected:  # it exits through Python (SystemExit), so multiprocessing's finalizers run
        assert core._process.exitcode == 128 + signal.SIGTERM
    else:  # maybe still starting, before its handler
        assert core._process.exitcode in (128 + signal.SIGTERM, -signal.SIGTERM)


def wait_until_torch_is_loading(pid: int) -> None:
    """Until torch's library is mapped into `pid`: the core is past its start, into the load."""
    process = psutil.Process(pid)
    for _ in range(1200):
        if any("libtorch" in m.path for m in process.memory_maps()):
            return
        time.sleep(0.05)
    raise AssertionError("the core never started loading torch")


ESCAPES_AFTER_SPAWN = """
import sys
from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import EngineCoreClient

if __name__ == "__main__":
    core = EngineCoreClient(EngineConfig(device="cpu"))
    core.spawn()
    print(core.pid, flush=True)
    {escape}
"""


@pytest.mark.slow
@pytest.mark.parametrize("escape", ["raise KeyboardInterrupt", "sys.exit(3)"])
def test_an_exit_that_skips_shutdown_stops_the_core(escape: str, tmp_path: Any) -> None:
    """Ctrl-C in the middle of `spawn()` (or any exception before the server owns the core) ends the API
    process without `shutdown()`: its exit must stop the core, not wait on it while it loads and serves."""
    script = tmp_path / "escape.py"
    script.write_text(ESCAPES_AFTER_SPAWN.format(escape=escape))
    command = [sys.executable, str(script)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        core_pid = int(process.stdout.readline())
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(core_pid).wait(30)
    assert not psutil.pid_exists(core_pid) or psutil.Process(core_pid).status() == psutil.STATUS_ZOMBIE
