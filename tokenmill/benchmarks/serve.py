"""Serving load: drive any OpenAI-compatible server at several concurrencies, streamed.

    tokenmill bench serve --url http://127.0.0.1:8000/v1
    tokenmill bench serve --url http://gpu-box:18000/v1 --concurrency 1,16,64 --json results.json
    tokenmill bench serve --url http://127.0.0.1:8000/v1 --launch "tokenmill serve --port 8000"

(`python benchmarks/serve.py ...` in the repository is the same.)

Every request is a fixed-seed synthetic prompt of about --prompt-words words on /v1/completions, with
temperature 0 (or --temperature), ignore_eos and --max-tokens, so tokenmill and vLLM do the same work.
Reports output tok/s and the p50/p99 of time to first token (TTFT) and time per output token after the
first (TPOT).

With --launch the benchmark also starts the server itself (a shell command), reports how long it took
to answer /health with 200 ("ready after"), samples the memory of the server's whole process tree (an API
process and engine processes count together; RSS and PSS, see PeakMemory) and reports the peaks, then
stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field

import openai
import psutil
from tqdm.auto import tqdm

from tokenmill.entrypoints.cli_args import api_key_from_env

WORDS = [
    "the", "a", "river", "mountain", "city", "engine", "token", "memory", "quiet", "bright", "window",
    "garden", "signal", "paper", "orbit", "market", "winter", "summer", "coffee", "forest", "bridge",
    "silver", "planet", "history", "music", "number", "light", "stone", "ocean", "train", "story",
    "letter", "morning", "evening", "cloud", "thunder", "road", "field", "school", "doctor", "camera",
    "unbelievable", "saxophone", "hummingbird", "avalanche", "nightingale", "magnolia", "boulevard",
]  # fmt: skip
"""Most are one token to the usual BPE vocabularies, the last seven two: 100 of them, with the
"Request N: " prefix, make a prompt of about 120 tokens (SmolLM2's tokenizer: 113-127, 119 on average),
as issue 6's workload asks."""


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""
    counted_chunks: bool = False
    """The server sent no usage, so `output_tokens` counts text chunks (one may hold several tokens)."""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    concurrency: int
    num_requests: int
    num_failed: int
    seconds: float
    output_tokens: int
    output_tok_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # distinct messages of the failed requests
    warnings: list[str] = field(default_factory=list)


def make_prompts(num: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(num)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"p50": at(0.50) * 1000, "p99": at(0.99) * 1000, "mean": sum(ordered) / len(ordered) * 1000}


async def one_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, temperature: float = 0.0
) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=True)
    chunks = 0
    usage_tokens = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if chunks == 0:
                    result.ttft = time.perf_counter() - start
                chunks += 1
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        return RequestResult(ok=False, error=f"{type(err).__name__}: {err}")
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.counted_chunks = usage_tokens is None
    if usage_tokens is not None and usage_tokens < max_tokens:
        # Measured on less work than the others: not a result of this workload.
        error = f"finished after {usage_tokens} of {max_tokens} tokens: the server does not honour ignore_eos"
        return RequestResult(ok=False, error=error)
    return result


async def run_level(
    client: openai.AsyncOpenAI,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    temperature: float = 0.0,
) -> LevelResult:
    semaphore = asyncio.Semaphore(concurrency)
    progress = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req", leave=False)

    async def limited(prompt: str) -> RequestResult:
        async with semaphore:
            result = await one_request(client, model, prompt, max_tokens, temperature)
        progress.update(1)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    seconds = time.perf_counter() - start
    progress.close()
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return LevelResult(
        concurrency=concurrency,
        num_requests=len(prompts),
        num_failed=len(results) - len(done),
        seconds=seconds,
        output_tokens=output_tokens,
        output_tok_s=output_tokens / seconds if seconds else 0.0,
        ttft_ms=percentiles([r.ttft for r in done]),
        tpot_ms=percentiles([t for r in done if (t := r.tpot) is not None]),
        errors=sorted({r.error for r in results if not r.ok and r.error}),
        warnings=[NO_USAGE_WARNING] if any(r.counted_chunks for r in done) else [],
    )


NO_USAGE_WARNING = (
    "the server sent no usage (stream_options.include_usage): output tokens were counted as text chunks, "
    "and a chunk may hold several, so tok/s may be low and TPOT high"
)


def print_table(results: list[LevelResult]) -> None:
    print(
        f"{'conc':>5} {'reqs':>5} {'failed':>6} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9}  (ms)"
    )
    for r in results:
        print(
            f"{r.concurrency:>5} {r.num_requests:>5} {r.num_failed:>6} {r.output_tok_s:>10.1f} "
            f"{r.ttft_ms.get('p50', 0):>9.1f} {r.ttft_ms.get('p99', 0):>9.1f} "
            f"{r.tpot_ms.get('p50', 0):>9.1f} {r.tpot_ms.get('p99', 0):>9.1f}"
        )
    for r in results:
        for error in r.errors:
            print(f"concurrency {r.concurrency}: a request failed: {error}", file=sys.stderr)
        for warning in r.warnings:
            print(f"concurrency {r.concurrency}: {warning}", file=sys.stderr)


class PeakMemory:
    """Samples the memory of a process and all its descendants on a thread, keeping the peaks in bytes:
    `rss` sums each process's resident set (pages shared between them count once per process), `pss`
    sums proportional set sizes (each shared page split among its sharers: the tree's real footprint)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss = pss = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with suppress(psutil.Error):  # it exited between the listing and the reading
                info = process.memory_full_info()
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_until_serving(url: str, server: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds from now until the server's /health answers 200 (tokenmill, vLLM and llama-server all say
    503 or do not listen while loading); raises if the server exits or times out."""
    health = url.removesuffix("/v1") + "/health"
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(health, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass  # not listening yet, or still loading (503)
        time.sleep(0.1)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def wait_while_loading(url: str, timeout: float) -> None:
    """Waits while a running server's /health says 503 (loading its model), up to `timeout` seconds; a
    server that answers anything else, or does not listen, is left to the requests to report."""
    health = url.removesuffix("/v1") + "/health"
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5):
                return
        except urllib.error.HTTPError as error:
            if error.code != 503:
                return
        except OSError:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the server at {url} was still loading after {timeout:.0f} s")
        print("the server is loading its model; waiting for /health 200", file=sys.stderr, flush=True)
        time.sleep(1)


@contextmanager
def launched_server(
    command: str, url: str, timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """Starts `command` in its own process group; yields (process, seconds until ready); stops it."""
    start = time.perf_counter()
    try:
        server = subprocess.Popen(shlex.split(command), start_new_session=True)
    except OSError as error:  # no such program (the baselines not built yet), not executable
        raise RuntimeError(f"cannot start {command!r}: {error.strerror}: {error.filename}") from None
    try:
        wait_until_serving(url, server, timeout)
        yield server, time.perf_counter() - start
    finally:
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def int_list(value: str) -> list[int]:
    return [int(part) for part in value.split(",") if part.strip()]


DEFAULT_NUM_REQUESTS = {1: 8, 16: 32, 64: 64}  # issue 6's workload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tokenmill bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="the server's API base URL (/v1 is added when missing, as vLLM's --base-url takes the root)",
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument(
        "--api-key", default=None, help="the server's key (default: VLLM_API_KEY or TOKENMILL_API_KEY)"
    )
    parser.add_argument(
        "--concurrency", "--max-concurrency", type=int_list, default=[1, 16, 64], help="e.g. 1,16,64"
    )
    parser.add_argument(
        "--num-requests",
        "--num-prompts",
        type=int_list,
        default=None,
        help="requests per level (default: 8/32/64 for levels 1/16/64, else 4x the level, at least 8)",
    )
    parser.add_argument(
        "--max-tokens", "--random-output-len", type=int, default=128, help="tokens per request"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy, the comparable workload; above 0 measures sampled decoding",
    )
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--launch", default=None, metavar="COMMAND", help="start the server with this command (see above)"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=600, help="seconds to wait for the server's /health 200"
    )
    args = parser.parse_args(argv)
    for flag in ("concurrency", "num_requests"):
        if any(n < 1 for n in getattr(args, flag) or [1]):
            parser.error(f"--{flag.replace('_', '-')} needs counts of at least 1")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.num_requests is None:
        args.num_requests = [DEFAULT_NUM_REQUESTS.get(c, max(8, 4 * c)) for c in args.concurrency]
    if len(args.num_requests) != len(args.concurrency):
        parser.error("--num-requests needs one count per --concurrency level")
    args.api_key = args.api_key or api_key_from_env() or "EMPTY"
    return args


async def main_async(args: argparse.Namespace) -> list[LevelResult]:
    async with openai.AsyncOpenAI(
        base_url=api_url(args.url), api_key=args.api_key, max_retries=0, timeout=600
    ) as client:
        model = args.model or (await client.models.list()).data[0].id
        results = []
        for concurrency, num in zip(args.concurrency, args.num_requests, strict=True):
            prompts = make_prompts(num, args.prompt_words, args.seed + concurrency)
            level = await run_level(client, model, prompts, concurrency, args.max_tokens, args.temperature)
            results.append(level)
        return results


def api_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def run_against_launched(args: argparse.Namespace) -> tuple[list[LevelResult], dict[str, float]]:
    with launched_server(args.launch, api_url(args.url), args.ready_timeout) as (server, ready_s):
        print(f"ready after {ready_s:.1f} s", flush=True)
        with PeakMemory(server.pid) as memory:
            results = asyncio.run(main_async(args))
        return results, {"ready_s": ready_s, "peak_rss_bytes": memory.rss, "peak_pss_bytes": memory.pss}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_facts: dict[str, float] = {}
    try:
        if args.launch:
            results, server_facts = run_against_launched(args)
        else:
            wait_while_loading(api_url(args.url), args.ready_timeout)
            results = asyncio.run(main_async(args))
    except openai.APIConnectionError:
        print(f"cannot reach a server at {args.url}", file=sys.stderr)
        return 1
    except openai.AuthenticationError:
        print(
            f"the server at {args.url} rejected the API key: pass the right one with --api-key",
            file=sys.stderr,
        )
        return 1
    except openai.APIStatusError as err:
        print(f"the server at {args.url} answered {err.status_code}: {err.message}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        print(f"tokenmill bench serve: {err}", file=sys.stderr)
        return 1
    print_table(results)
    if server_facts:
        rss_gb, pss_gb = server_facts["peak_rss_bytes"] / 1e9, server_facts["peak_pss_bytes"] / 1e9
        print(
            f"ready after {server_facts['ready_s']:.1f} s; "
            f"server processes at peak: RSS {rss_gb:.2f} GB, PSS {pss_gb:.2f} GB"
        )
    if args.json:
        report = {"url": args.url, "max_tokens": args.max_tokens, "levels": [asdict(r) for r in results]}
        with open(args.json, "w") as sink:
            json.dump(report | server_facts, sink, indent=2)
    return 0 if all(r.num_failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
