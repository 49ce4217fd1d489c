"""Decode time per step, float vs quantized models (`--quantization int8`, `gguf`), side by side in one run.

    python benchmarks/decode_bench.py                         # SmolLM2 (embedded), float32, batch 1 16 64
    python benchmarks/decode_bench.py --methods int8 gguf      # the two quantized paths only
    OMP_NUM_THREADS=1 python benchmarks/decode_bench.py --repeats 5

A step's time is (generate with 1 + N new tokens - generate with 1 new token) / N: the prefill cancels.
Prompts are fixed-seed random token ids. The engines alternate within each repetition so machine load
hits them alike; the table shows medians over the repetitions and each method's speed-up over the first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams


def generate_seconds(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def step_ms(llm: LLM, prompts: list[list[int]], num_steps: int) -> float:
    full = generate_seconds(llm, prompts, 1 + num_steps)
    prefill = generate_seconds(llm, prompts, 1)
    return (full - prefill) / num_steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", nargs="+", default=["float", "int8", "gguf"], choices=["float", "int8", "gguf"]
    )
    args = parser.parse_args()

    engines = {
        method: LLM(
            args.model,
            dtype=args.dtype,
            max_model_len=512,
            kv_cache_memory=256 << 20,
            quantization=None if method == "float" else method,
        )
        for method in args.methods
    }
    first = args.methods[0]
    vocab_size = engines[first].engine.core.vocab_size
    rng = random.Random(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}; ms per step")
    print(
        f"{'batch':>5} "
        + " ".join(f"{m:>8}" for m in args.methods)
        + "".join(f" {first + '/' + m:>12}" for m in args.methods[1:])
    )
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(100, vocab_size) for _ in range(args.prompt_len)] for _ in range(batch)]
        for llm in engines.values():
            generate_seconds(llm, prompts, 2)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                times[name].append(step_ms(llm, prompts, args.steps))
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratios = "".join(f" {medians[first] / medians[m]:>11.2f}x" for m in args.methods[1:])
        print(f"{batch:>5} " + " ".join(f"{medians[m]:>8.1f}" for m in args.methods) + ratios, flush=True)


if __name__ == "__main__":
    main()
