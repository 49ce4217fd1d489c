"""`AsyncLLM`: the API server's engine. The core steps in its own process; this side (tokenization,
detokenization, stop strings, n > 1 merging) runs on the event loop and never blocks it.

Each request gets an asyncio queue of `RequestOutput`s; `generate()` yields from it and aborts the
request in the core when its consumer goes away (a client disconnect cancels the task).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import CoreFailed, CoreMessage, CoreOutputs, CoreReady, EngineCoreClient
from tokenmill.engine.outputs import EngineCoreOutput, RequestOutput
from tokenmill.engine.processor import PromptType
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class RequestAbortedError(RuntimeError):
    """The request was aborted with `AsyncLLM.abort()` while its outputs were being read."""


class EngineDeadError(RuntimeError):
    """The engine core is not running (it failed to load or died)."""


@dataclass
class RequestTiming:
    """One finished sequence's latencies, for the stat loggers."""

    num_prompt_tokens: int
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generation_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def update(self, now: float, num_new_tokens: int) -> None:
        if num_new_tokens == 0:
            return
        if self.first_token_time is None:
            self.first_token_time = now
        elif self.last_token_time is not None:
            self.inter_token_latencies.append((now - self.last_token_time) / num_new_tokens)
        self.last_token_time = now
        self.num_generation_tokens += num_new_tokens


class StatLogger(Protocol):
    def record_finished(self, timing: RequestTiming, now: float) -> None: ...


class AsyncLLM:
    """The engine behind the API: `await start()`, then `generate()` per request; `shutdown()` at exit."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        max_logprobs: int = 20,
        stat_loggers: Sequence[StatLogger] = (),
        client_factory: Callable[[EngineConfig, Callable[[CoreMessage], None]], Any] = EngineCoreClient,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """`on_failure` is called, on the event loop, with the reason when the core fails or dies."""
        self.config = config
        self.on_failure = on_failure
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_logprobs = max_logprobs
        self.stat_loggers = list(stat_loggers)
        self.max_model_len = 0
        self.vocab_size = 0
        self.errored = False
        self.error_message: str | None = None
        self._ready = False
        self._stats = SchedulerStats()
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._num_seqs: dict[str, int] = {}
        self._timings: dict[str, RequestTiming] = {}
        self._max_in_flight = config.scheduler.max_num_seqs + config.scheduler.max_waiting
        # One worker: prompts are tokenized off the event loop, one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-tokenize")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_future: asyncio.Future[None] | None = None
        self._client_factory = client_factory
        self._client: Any = None
        self.input_processor: Any = None
        self.output_processor: Any = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def launch(self) -> None:
        """Starts the core process, which loads the model meanwhile; call from the event loop's thread."""
        self._loop = asyncio.get_running_loop()
        self._ready_future = self._loop.create_future()
        self._client = self._client_factory(self.config, self._on_message_threadsafe)
        self._client.start()

    def set_tokenizer(self, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        """For a server that loads the tokenizer while the core loads the model: before `start()` ends."""
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids

    async def start(self) -> None:
        """Starts the core process (unless `launch()` did) and waits until the model is loaded; raises
        EngineDeadError if it is not."""
        if self._client is None:
            self.launch()
        assert self._ready_future is not None
        await self._ready_future
        from tokenmill.engine.output_processor import OutputProcessor
        from tokenmill.engine.processor import InputProcessor

        self.input_processor = InputProcessor(
            self.tokenizer, self.max_model_len, self.vocab_size, self.eos_token_ids, self.max_logprobs
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ready = True

    @property
    def is_ready(self) -> bool:
        return self._ready and not self.errored

    @property
    def core_pid(self) -> int | None:
        return self._client.pid if self._client is not None else None

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def get_stats(self) -> SchedulerStats:
        return self._stats

    async def run_in_executor(self, fn: Any, *args: Any) -> Any:
        """Runs tokenizer work (encode, chat templates) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- requests -----------------------------------------------------------------------------------

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's outputs (following params.output_kind) until it finishes.

        Raises ValueError for an invalid prompt, EngineOverloadedError when the queue is full and
        EngineDeadError when the core is gone."""
        self._check_can_accept(params.n)
        processed = await self.run_in_executor(self.input_processor.process, request_id, prompt, params)
        self._check_can_accept(params.n)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        output_queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._queues[request_id] = output_queue
        self._num_seqs[request_id] = len(processed.core_requests)
        now = time.monotonic()
        for child in processed.core_requests:
            self._timings[child.request_id] = RequestTiming(len(child.prompt_token_ids), now)
        self.output_processor.add_request(processed, request_id, params)
        assert self._client is not None
        self._client.add_requests(processed.core_requests)
        finished = False
        try:
            while not finished:
                item = await output_queue.get()
                if isinstance(item, Exception):
                    finished = True  # the core is gone, or the request was aborted already
                    raise item
                finished = item.finished
                yield item
        finally:
            self._forget(request_id)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV blocks (no-op when it already finished); a `generate()`
        still iterating it raises RequestAbortedError."""
        output_queue = self._queues.get(request_id)
        if output_queue is not None:
            output_queue.put_nowait(RequestAbortedError(f"request {request_id} was aborted"))
        self._forget(request_id)
        if self.output_processor is None or self._client is None:
            return
        child_ids = self.output_processor.abort_request(request_id)
        for child_id in child_ids:
            self._timings.pop(child_id, None)
        self._client.abort_requests(list(child_ids))

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._num_seqs.pop(request_id, None)

    @property
    def max_in_flight(self) -> int:
        """The most sequences the engine holds at once, running and waiting."""
        return self._max_in_flight

    def _check_can_accept(self, num_seqs: int) -> None:
        if self.errored or not self._ready:
            raise EngineDeadError(self.error_message or "the engine is still loading the model")
        if num_seqs > self._max_in_flight:  # no retry could succeed: the request's own fault
            raise ValueError(
                f"n={num_seqs} is more sequences than this server takes at once ({self._max_in_flight}: "
                "--max-num-seqs plus --max-waiting)"
            )
        in_flight = sum(self._num_seqs.values())
        if in_flight + num_seqs > self._max_in_flight:
            raise EngineOverloadedError(
                f"the server is at capacity ({in_flight} sequences in flight, {self._max_in_flight} allowed)"
                "; retry shortly"
            )

    # --- messages from the core ---------------------------------------------------------------------

    def _on_message_threadsafe(self, message: CoreMessage) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed while the core was still talking
            self._loop.call_soon_threadsafe(self._on_message, message)

    def _on_message(self, message: CoreMessage) -> None:
        if isinstance(message, CoreOutputs):
            self._stats = message.stats
            self._process_outputs(message.outputs)
        elif isinstance(message, CoreReady):
            self._on_ready(message)
        elif isinstance(message, CoreFailed):
            self._on_failed(message)

    def _on_ready(self, message: CoreReady) -> None:
        self.max_model_len, self.vocab_size = message.max_model_len, message.vocab_size
        self._stats = message.stats
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_result(None)

    def _on_failed(self, message: CoreFailed) -> None:
        self.errored = True
        self.error_message = message.message
        if message.details:
            logger.debug("engine core failure:\n%s", message.details)
        error = EngineDeadError(message.message)
        for output_queue in self._queues.values():
            output_queue.put_nowait(error)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(error)
        if self.on_failure is not None:
            self.on_failure(message.message)

    def _process_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        self._record_timings(outputs)
        request_outputs, to_abort = self.output_processor.process_outputs(outputs)
        if to_abort:
            assert self._client is not None
            self._client.abort_requests(list(to_abort))
            self._record_stopped(to_abort)
        for output in request_outputs:
            output_queue = self._queues.get(output.request_id)
            if output_queue is not None:
                output_queue.put_nowait(output)

    def _record_timings(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            timing = self._timings.get(output.request_id)
            if timing is None:
                continue
            timing.update(now, len(output.new_token_ids))
            if output.finish_reason is not None:
                del self._timings[output.request_id]
                timing.finish_reason = output.finish_reason.value
                self._record_finished(timing, now)

    def _record_stopped(self, child_ids: Sequence[str]) -> None:
        """Sequences the frontend finished on a stop string (the core only sees an abort)."""
        now = time.monotonic()
        for child_id in child_ids:
            timing = self._timings.pop(child_id, None)
            if timing is not None:
                timing.finish_reason = "stop"
                self._record_finished(timing, now)

    def _record_finished(self, timing: RequestTiming, now: float) -> None:
        for stat_logger in self.stat_loggers:
            stat_logger.record_finished(timing, now)
