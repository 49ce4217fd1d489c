"""Offline throughput: a fixed-seed batch of requests through tokenmill or through transformers.

    tokenmill bench throughput                        # tokenmill, the embedded default model
    tokenmill bench throughput --backend hf           # the same workload through transformers generate
    tokenmill bench throughput --quantization gguf    # tokenmill over the GGUF's own 4-bit blocks

(`python benchmarks/throughput.py ...` in the repository is the same.)

Prompts are random token ids (lengths uniform in --input-len-range, or all --input-len), every request
generates exactly --output-len tokens (ignore_eos, greedy), so both backends do the same work. Prints
output and total tok/s. The engine takes `tokenmill serve`'s engine flags (--max-num-seqs,
--kv-cache-memory, ...); --seed also seeds the prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenmill.benchmarks.offline import (
    build_llm,
    check_context,
    make_parser,
    parse_engine_args,
    random_prompts,
    require_at_least,
    write_json,
)
from tokenmill.engine.processor import TokensPrompt


@dataclass
class Result:
    backend: str
    model: str
    dtype: str
    quantization: str | None
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def make_prompts(vocab_size: int, args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    low, high = args.input_len_range
    return random_prompts(vocab_size, [rng.randint(low, high) for _ in range(args.num_requests)], rng)


def run_tokenmill(args: argparse.Namespace) -> Result:
    from tokenmill import SamplingParams

    llm = build_llm(args.engine_args)
    check_context(llm, "tokenmill bench throughput", args.input_len_range[1], args.output_len)
    prompts = make_prompts(llm.engine.core.vocab_size, args)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(token_prompts[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(token_prompts, params)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    dtype = str(llm.engine.core.dtype).removeprefix("torch.")
    num_prompt = sum(map(len, prompts))
    model = args.model or "default"
    return Result("tokenmill", model, dtype, args.quantization, len(prompts), num_prompt, num_out, seconds)


def load_hf_model(args: argparse.Namespace) -> tuple[Any, str]:  # a transformers PreTrainedModel
    """The same checkpoint as tokenmill loads (GGUF included), as a transformers model."""
    from transformers import AutoModelForCausalLM

    from tokenmill.engine.core import resolve_device
    from tokenmill.loader import iter_weights, load_hf_config, resolve_dtype, resolve_model

    source = resolve_model(args.model)
    dtype = resolve_dtype(args.dtype, resolve_device("auto"))
    model = AutoModelForCausalLM.from_config(load_hf_config(source), dtype=dtype)
    missing, _ = model.load_state_dict(dict(iter_weights(source, dtype)), strict=False)
    assert set(missing) <= {"lm_head.weight"}, f"weights missing: {missing}"
    model.tie_weights()
    return model.eval(), str(dtype).removeprefix("torch.")


def run_hf(args: argparse.Namespace) -> Result:
    model, dtype = load_hf_model(args)
    prompts = make_prompts(model.config.vocab_size, args)
    pad_id = 0
    start = time.perf_counter()
    num_out = 0
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), args.hf_batch_size), desc="hf generate", unit="batch"):
            batch = prompts[i : i + args.hf_batch_size]
            width = max(map(len, batch))
            # Left padding, as decoder-only generation needs.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=pad_id,
            )
            num_out += (out.shape[1] - width) * len(batch)
    seconds = time.perf_counter() - start
    num_prompt = sum(map(len, prompts))
    return Result("hf", args.model or "default", dtype, None, len(prompts), num_prompt, num_out, seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("tokenmill bench throughput", __doc__)
    parser.add_argument("--backend", choices=["tokenmill", "hf"], default="tokenmill")
    parser.add_argument("--num-requests", "--num-prompts", type=int, default=64)
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--input-len-range", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    lengths.add_argument("--input-len", type=int, help="every prompt this long (vLLM's flag)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--hf-batch-size", "--hf-max-batch-size", type=int, default=16, help="--backend hf's padded batch"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--output-json", metavar="FILE", help="also write the result to FILE")
    args = parse_engine_args(parser, argv)
    if args.input_len is not None:
        args.input_len_range = (args.input_len, args.input_len)
    low, high = args.input_len_range
    if not 1 <= low <= high:
        parser.error(f"prompt lengths {low}..{high}: need 1 <= MIN <= MAX")
    require_at_least(parser, args, dict.fromkeys(("num_requests", "output_len", "hf_batch_size"), 1))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_tokenmill(args) if args.backend == "tokenmill" else run_hf(args)
    report = {**asdict(result), "output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s}
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{result.backend} ({result.dtype}): {result.num_requests} requests, "
            f"{result.prompt_tokens} prompt + "
            f"{result.output_tokens} output tokens in {result.seconds:.1f} s: "
            f"{result.output_tok_s:.1f} output tok/s, {result.total_tok_s:.1f} total tok/s"
        )
        print(  # vllm bench throughput's line, for scripts that read it
            f"Throughput: {result.num_requests / result.seconds:.2f} requests/s, "
            f"{result.total_tok_s:.2f} total tokens/s, {result.output_tok_s:.2f} output tokens/s"
        )
    write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
