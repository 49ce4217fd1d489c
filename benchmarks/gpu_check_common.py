"""What the GPU check's parts share: the table of results, the phases that fill it, the models it builds
and the environment it sets. One module, imported by gpu_check.py and its check modules alike, so there
is one table (gpu_check.py runs as __main__: a check module importing it would get a second copy)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROWS: list[tuple[str, str, str]] = []  # (check, result, detail)
SCRIPT_START = time.perf_counter()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,", "Water boils at"]


def record(check: str, result: str, detail: str = "") -> None:
    ROWS.append((check, result, detail))
    print(f"[gpu_check] {check}: {result} {detail}", flush=True)


def phase(name: str, fn: Callable[[], None]) -> None:
    start = time.perf_counter()
    try:
        fn()
    except Exception as error:  # one broken phase must not hide the others' results
        traceback.print_exc()
        record(name, "ERROR", f"{type(error).__name__}: {str(error)[:200]}")
    print(f"[gpu_check] {name} took {time.perf_counter() - start:.1f} s", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_results(device_name: str) -> None:
    """The rows as one JSON line, then the table: last, as the device run's record."""
    print(json.dumps({"device": device_name, "rows": ROWS}))
    print_table(device_name)


def print_table(device_name: str) -> None:
    print(f"\n## gpu_check on {device_name}, torch {torch.__version__}")
    print("| check | result | detail |\n|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |", flush=True)


@contextlib.contextmanager
def cut_off_at_time_limit(args: argparse.Namespace, on_cut_off: Callable[[float], None]) -> Iterator[None]:
    """Runs the block; if it is still running at --time-limit, calls `on_cut_off(seconds it ran)`, prints
    the table and exits, so that a long baseline cannot cost the table (the device time is what it is)."""
    if args.time_limit is None:
        yield
        return
    started = time.perf_counter()

    def cut_off() -> None:
        on_cut_off(time.perf_counter() - started)
        print_results(args.device_name)
        sys.stdout.flush()
        os._exit(0)

    timer = threading.Timer(max(0.0, args.time_limit - (started - SCRIPT_START)), cut_off)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def model_dir(config: object, tokenizer_dir: Path, weights: bool) -> Path:
    """A model directory: config + tokenizer, and (weights=True) random weights saved by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    config.save_pretrained(directory)  # type: ignore[attr-defined]
    if weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
        model.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for a block (the engine reads its backend choices from there)."""
    from tokenmill.kernels import gpu

    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    gpu._mode.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        gpu._mode.cache_clear()


def sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()
