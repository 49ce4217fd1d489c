"""The engine's logging: warnings for everything, plus its start-up figures (KV cache size, GPU memory
budget, CUDA graph capture time and memory) at INFO, which a user of `tokenmill serve` or `LLM` should see.

Each process configures its own (the engine core runs in a spawned process). An application that has set
up logging keeps its handlers; only these loggers' levels are set.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
START_UP_LOGGERS = ("tokenmill.engine", "tokenmill.worker", "tokenmill.model")


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)  # a no-op where logging is set up
    for name in START_UP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
