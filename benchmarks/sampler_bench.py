"""Sampler.forward on CPU: the fast paths against the full-vocabulary paths, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/sampler_bench.py
    OMP_NUM_THREADS=1 python benchmarks/sampler_bench.py --rows 64 --logits flat --also-rev 3904f7b

Each case times `Sampler(cpu_fast_paths=False)` (the baseline: a vocabulary sort for top_p, a vocabulary
of Exponential draws per row) and `Sampler()` one after the other on the same fixed-seed logits, and
reports the median of at least --repeats calls and their ratio. --also-rev REV times the sampler.py of a
git revision as well (the code before the fast paths existed).

Logits: `lm` gives each row a power-law head (exponent uniform in [1.1, 2.5] over a random permutation of
the vocabulary, like a language model's next-token distribution); `flat` is N(0, 3^2) noise, whose top_p
nucleus is thousands of tokens wide, so every row falls back to the sort (the fast path's worst case).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import FAST_PATH_CANDIDATES, Sampler, nucleus_threshold
from tokenmill.sampling_params import SamplingParams

CASES: dict[str, SamplingParams] = {
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k 50 + top_p 0.9": SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
    "greedy": SamplingParams(temperature=0.0),
}


def make_logits(kind: str, num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(num_rows, vocab, generator=generator) * 3.0
    exponent = 1.1 + 1.4 * torch.rand(num_rows, 1, generator=generator)  # [num_rows, 1]
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()  # [vocab]
    by_rank = -exponent * ranks + 0.3 * torch.randn(num_rows, vocab, generator=generator)
    places = torch.rand(num_rows, vocab, generator=generator).argsort(dim=-1)
    return torch.empty_like(by_rank).scatter_(1, places, by_rank)  # [num_rows, vocab]


def fraction_sorted(logits: torch.Tensor, params: SamplingParams) -> float:
    """Share of rows whose top_p nucleus is wider than the fast path's top tokens (they are sorted)."""
    probs = (logits / params.temperature).softmax(dim=-1)
    top_p = torch.full((logits.shape[0],), params.top_p)
    is_decided = nucleus_threshold(probs.topk(FAST_PATH_CANDIDATES).values, top_p)[1]
    return 1.0 - float(is_decided.float().mean())


def sampler_at_rev(rev: str) -> Callable[..., Any]:
    """The Sampler class of tokenmill/sample/sampler.py at git revision `rev`."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:tokenmill/sample/sampler.py"], cwd=root, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_at_rev.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("sampler_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Sampler  # type: ignore[no-any-return]


def median_seconds(sampler: torch.nn.Module, logits: torch.Tensor, metadata: SamplingMetadata) -> float:
    start = time.perf_counter()
    sampler(logits, metadata)  # warm-up
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(max(ARGS.repeats, min(50, int(0.5 / warm_up)))):  # cheap cases: more calls
        start = time.perf_counter()
        sampler(logits, metadata)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(num_rows: int, samplers: dict[str, torch.nn.Module]) -> None:
    logits = make_logits(ARGS.logits, num_rows, ARGS.vocab, ARGS.seed)
    print(f"\n[{num_rows}, {ARGS.vocab}] {ARGS.logits} logits, median of >= {ARGS.repeats} calls (ms)")
    names = list(samplers)
    baselines = [name for name in names if name != "fast"]
    print(f"| case | {' | '.join(names)} | {' | '.join(f'{name} / fast' for name in baselines)} |")
    print("|---|" + "---|" * (len(names) + len(baselines)))
    for case, params in CASES.items():
        empty: list[list[int]] = [[]] * num_rows
        metadata = SamplingMetadata.build(
            [params] * num_rows, empty, empty, [None] * num_rows, ARGS.vocab, logits.device
        )
        ms = {name: 1e3 * median_seconds(sampler, logits, metadata) for name, sampler in samplers.items()}
        is_top_p_alone = params.top_p < 1.0 and params.top_k == 0  # within a top_k, nothing is sorted
        note = f" ({fraction_sorted(logits, params):.0%} of rows sorted)" if is_top_p_alone else ""
        cells = " | ".join(f"{ms[name]:.1f}" for name in names)
        ratios = " | ".join(f"{ms[name] / ms['fast']:.1f}x" for name in baselines)
        print(f"| {case}{note} | {cells} | {ratios} |", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    parser.add_argument("--logits", choices=["lm", "flat"], default="lm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--also-rev", help="also time the sampler of this git revision")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    torch.manual_seed(ARGS.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {sys.platform}")
    samplers: dict[str, torch.nn.Module] = {"full": Sampler(cpu_fast_paths=False), "fast": Sampler()}
    if ARGS.also_rev:
        samplers = {f"at {ARGS.also_rev}": sampler_at_rev(ARGS.also_rev)(), **samplers}
    for rows in ARGS.rows:
        bench(rows, samplers)
