"""The engine core in its own process, and the client the API process drives it with.

    API process                                    core process (spawn)
    EngineCoreClient.add_requests / abort  --Queue-->  drain inputs (block when idle)
                                                       EngineCore.step()
    reader thread -> on_message(...)      <--Pipe---   CoreOutputs(outputs, stats)

The core reports `CoreReady` (max_model_len, vocab size) once loaded or `CoreFailed` with the reason, and
exits by itself when the API process goes away. The reader thread sees the pipe close when the core dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.outputs import EngineCoreOutput, EngineCoreRequest
from tokenmill.kernels.build import build_in_background
from tokenmill.logging_config import configure_logging
from tokenmill.metrics.stats import SchedulerStats

logger = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0
_SHUTDOWN_GRACE_S = 5.0


# --- messages ---------------------------------------------------------------------------------------


@dataclass
class AddRequests:
    requests: list[EngineCoreRequest]


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


@dataclass
class CoreReady:
    max_model_len: int
    vocab_size: int
    stats: SchedulerStats


@dataclass
class CoreFailed:
    """The core could not load, or died stepping; `message` says why."""

    message: str
    details: str = ""


@dataclass
class CoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats = field(default_factory=SchedulerStats)


CoreMessage = CoreReady | CoreFailed | CoreOutputs


# --- the core process -------------------------------------------------------------------------------


def run_engine_core(config: EngineConfig, inputs: Connection, conn: Connection, parent_pid: int) -> None:
    """The core process's main: load, report, then loop until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process owns Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    configure_logging()  # a spawned process starts without the API process's logging
    if runs_on_cpu(config.device):
        build_in_background()  # a cold build of the C kernels (~3 s) overlaps torch's import
    try:
        from tokenmill.engine.core import EngineCore

        core = EngineCore(config)
    except Exception as err:
        conn.send(CoreFailed(f"{type(err).__name__}: {err}", traceback.format_exc()))
        return
    conn.send(CoreReady(core.max_model_len, core.vocab_size, core.get_stats()))
    try:
        _core_loop(core, inputs, conn, parent_pid)
    except (BrokenPipeError, EOFError):
        pass  # the API process went away
    except Exception as err:
        conn.send(CoreFailed(f"the engine core failed: {type(err).__name__}: {err}", traceback.format_exc()))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Terminated (stopped while loading): exit through Python, so multiprocessing's finalizers release
    what the load created (tqdm's lock; else a "leaked semaphore" warning at the server's exit)."""
    raise SystemExit(128 + signum)


def runs_on_cpu(device: str) -> bool:
    """Whether the core will run on the CPU, told before torch loads: "auto" takes CUDA where NVIDIA's
    driver is."""
    return device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl"))


def _core_loop(core: Any, inputs: Connection, conn: Connection, parent_pid: int) -> None:
    while True:
        messages = _drain(inputs, block=not core.has_unfinished_requests(), parent_pid=parent_pid)
        for message in messages:
            if isinstance(message, Shutdown):
                return
            if isinstance(message, AddRequests):
                for request in message.requests:
                    core.add_request(request)
            elif isinstance(message, AbortRequests):
                core.abort_requests(message.request_ids)
        outputs = core.step() if core.has_unfinished_requests() else []
        if outputs or messages:
            conn.send(CoreOutputs(outputs, core.get_stats()))


def _drain(inputs: Connection, block: bool, parent_pid: int) -> list[Any]:
    """Every queued message; when `block`, waits for at least one (or returns Shutdown if orphaned)."""
    messages: list[Any] = []
    try:
        while block and not messages:
            if inputs.poll(_PARENT_CHECK_S):
                messages.append(inputs.recv())
            elif os.getppid() != parent_pid:
                return [Shutdown()]
        while inputs.poll():
            messages.append(inputs.recv())
    except EOFError:
        messages.append(Shutdown())  # the API process closed its end
    return messages


# --- the client -------------------------------------------------------------------------------------


class EngineCoreClient:
    """Starts the core process and talks to it; `on_message` runs on the reader thread."""

    def __init__(self, config: EngineConfig, on_message: Callable[[CoreMessage], None] | None = None) -> None:
        self.config = config
        self.on_message = on_message
        self._context = multiprocessing.get_context("spawn")
        # Messages to the core go through a thread, so a full pipe never blocks the event loop.
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._process: Any = None
        self._pipes: tuple[Connection, Connection] | None = None
        self._core_ready = False  # CoreReady arrived: the core reads its inputs (a loading one does not)
        self._closing = False

    def spawn(self) -> None:
        """Starts the core process, which begins loading the model; `start()` connects to it later."""
        core_inputs, to_core = self._context.Pipe(duplex=False)
        from_core, core_outputs = self._context.Pipe(duplex=False)
        self._process = self._context.Process(
            target=run_engine_core,
            args=(self.config, core_inputs, core_outputs, os.getpid()),
            name="tokenmill-engine-core",
            daemon=True,  # an exit that skips shutdown() (Ctrl-C mid-spawn) terminates it, not joins it
        )
        self._process.start()
        core_inputs.close()  # only the core holds these ends: its exit closes the pipes
        core_outputs.close()
        self._pipes = (to_core, from_core)

    def adopt(self, config: EngineConfig, on_message: Callable[[CoreMessage], None]) -> EngineCoreClient:
        """A client factory (see `AsyncLLM`) that hands over this client, spawned ahead of the engine."""
        if config != self.config:
            raise ValueError("the engine core was spawned with another configuration")
        self.on_message = on_message
        return self

    def start(self) -> None:
        """Spawns the core unless `spawn()` did, and starts the threads that talk to it."""
        if self._pipes is None:
            self.spawn()
        assert self._pipes is not None and self.on_message is not None, "spawned without adopt()"
        to_core, from_core = self._pipes
        threading.Thread(
            target=self._read, args=(from_core, self.on_message), name="tokenmill-core-reader", daemon=True
        ).start()
        threading.Thread(
            target=self._write, args=(to_core,), name="tokenmill-core-writer", daemon=True
        ).start()

    def _write(self, to_core: Connection) -> None:
        while True:
            message = self._outbox.get()
            try:
                to_core.send(message)
            except (BrokenPipeError, OSError):
                return
            if isinstance(message, Shutdown):
                to_core.close()
                return

    def _read(self, receiver: Connection, on_message: Callable[[CoreMessage], None]) -> None:
        while True:
            try:
                message = receiver.recv()
            except (EOFError, OSError):
                if not self._closing:
                    code = self._process.exitcode if self._process is not None else None
                    on_message(CoreFailed(f"the engine core process exited (exit code {code})"))
                return
            if isinstance(message, CoreReady):
                self._core_ready = True
            on_message(message)
            if isinstance(message, CoreFailed):
                return

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._outbox.put(AddRequests(requests))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self._closing:
            self._outbox.put(AbortRequests(list(request_ids)))

    def shutdown(self) -> None:
        """Asks the core to stop, then terminates and kills it if it does not. A core still loading (the
        server stopped or failed meanwhile) is terminated at once: it reads nothing until loaded."""
        if self._closing:
            return
        self._closing = True
        process = self._process
        self._outbox.put(Shutdown())
        if process is not None and process.is_alive():
            if not self._core_ready:
                process.terminate()
            process.join(_SHUTDOWN_GRACE_S)
            if process.is_alive():
                process.terminate()
                process.join(_SHUTDOWN_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
