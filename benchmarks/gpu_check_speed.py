"""The GPU check's checks 3, 4 and 5: the nano-vllm workload against transformers generate, and batch-1
decode against the roofline with and without CUDA graphs (see gpu_check.py)."""

from __future__ import annotations

import argparse
import gc
import random
import time
import traceback
from typing import Any

import torch

from gpu_check_common import cut_off_at_time_limit, environment, model_dir, record, sync


def nano_workload(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    n, low, high = (256, 100, 1024) if not args.smoke else (8, 10, 40)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(low, high))] for _ in range(n)]
    return prompts, [rng.randint(low, high) for _ in range(n)]


def qwen3_06b_config(args: argparse.Namespace) -> object:
    from transformers import Qwen3Config

    if args.smoke:
        return Qwen3Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, tie_word_embeddings=True,
    )  # fmt: skip


def check_nano_workload(args: argparse.Namespace) -> None:
    from tokenmill import LLM, SamplingParams

    config = qwen3_06b_config(args)
    directory = model_dir(config, args.tokenizer, weights=False)
    prompts, out_lens = nano_workload(args)
    useful = sum(out_lens)
    llm = LLM(str(directory), load_format="dummy", dtype=args.dtype, max_model_len=4096, device=args.device,
              max_num_seqs=256, max_num_batched_tokens=16384, gpu_memory_utilization=0.8)  # fmt: skip
    params = [SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True) for m in out_lens]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params[:2], use_tqdm=False)
    sync(args)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == useful
    del llm, outputs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()  # our KV cache's memory, for transformers' cache
    ours_detail = f"tokenmill {useful / ours:.0f} tok/s ({ours:.1f} s)"
    with cut_off_at_time_limit(args, lambda waited: record_hf_cut_off(ours, ours_detail, waited)):
        theirs, batches = hf_generate_seconds(config, prompts, out_lens, args)
    ratio = theirs / ours
    in_batches = "one padded batch" if batches == 1 else f"{batches} padded batches, for memory"
    record(
        "3 nano-vllm workload",
        "PASS" if ratio >= 10 else "BELOW GOAL",
        f"{ours_detail}, transformers {useful / theirs:.0f} tok/s ({theirs:.1f} s, {in_batches}): "
        f"{ratio:.1f}x (goal 10x)",
    )


def record_hf_cut_off(ours: float, ours_detail: str, waited: float) -> None:
    """Row 3 when transformers is still generating at the time limit: its time is at least `waited`, so
    the ratio is at least waited / ours (a lower bound, enough to show the goal when it is over 10)."""
    bound = waited / ours
    record(
        "3 nano-vllm workload",
        "PASS" if bound >= 10 else "UNKNOWN",
        f"{ours_detail}, transformers unfinished after {waited:.0f} s (stopped at the time limit): "
        f">= {bound:.1f}x (goal 10x)",
    )


def hf_generate_seconds(
    config: Any, prompts: list[list[int]], out_lens: list[int], args: argparse.Namespace
) -> tuple[float, int]:
    """transformers generate on left-padded batches of the requests, each up to its longest output: all of
    them in one batch where the GPU holds its cache, else in the fewest equal batches that fit. Returns
    the seconds and the number of batches."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    model.generation_config.eos_token_id = None
    batch_size = len(prompts)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        tokens_per_request = max(map(len, prompts)) + max(out_lens)
        free_bytes = torch.cuda.mem_get_info()[0]
        batch_size = hf_batch_size(config, batch_size, tokens_per_request, model.dtype, free_bytes)
    seconds = 0.0
    for first in range(0, len(prompts), batch_size):
        batch, lens = prompts[first : first + batch_size], out_lens[first : first + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        sync(args)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), do_sample=True,
                           temperature=0.6, top_k=0, pad_token_id=0)  # fmt: skip
        sync(args)
        seconds += time.perf_counter() - start
    del model
    return seconds, -(-len(prompts) // batch_size)


HF_ACTIVATION_BYTES = 8 << 30  # the prefill's activations and mask beside the cache, generously


def hf_batch_size(
    config: Any, num_requests: int, tokens_per_request: int, dtype: torch.dtype, free_bytes: int
) -> int:
    """Requests per generate call: all of them, halved until their cache fits in `free_bytes`. The cache
    grows by concatenation, a layer's old and new tensors both alive, and the allocator rarely reuses the
    smaller blocks: budget twice its final size (on an H100, 256 requests of up to 2048 tokens would need
    60 GB of Qwen3-0.6B cache, and run out of memory near their end)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    bytes_per_token *= torch.empty(0, dtype=dtype).element_size()
    budget = free_bytes - HF_ACTIVATION_BYTES
    batch_size = num_requests
    while batch_size > 1 and 2 * batch_size * tokens_per_request * bytes_per_token > budget:
        batch_size = -(-batch_size // 2)
    return batch_size


def copy_bandwidth(args: argparse.Namespace) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30 if not args.smoke else 1 << 24, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(args)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(args)
    return 2 * 10 * src.numel() / (time.perf_counter() - start)


def llama_8b_config(args: argparse.Namespace) -> object:
    from transformers import LlamaConfig

    if args.smoke:
        return LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
    )  # fmt: skip


BATCH1_PROMPT = {"prompt_token_ids": list(range(1000, 1128))}  # checks 4 and 5: one 128-token prompt
BATCH1_SECONDS: dict[str, float] = {}  # check 4's seconds per token, for check 5's comparison


def check_batch1_decode(args: argparse.Namespace, enforce_eager: bool) -> None:
    from tokenmill import LLM

    directory = model_dir(llama_8b_config(args), args.tokenizer, weights=False)
    llm = LLM(str(directory), load_format="dummy", dtype=args.dtype, max_model_len=2048, device=args.device,
              max_num_seqs=8, enforce_eager=enforce_eager, gpu_memory_utilization=0.8)  # fmt: skip
    model = llm.engine.core.runner.model
    embed_bytes = model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embed_bytes
    num_decode = 512 if not args.smoke else 16
    per_token = decode_seconds_per_token(llm, num_decode, args)
    bandwidth = copy_bandwidth(args)
    roofline = weight_bytes / bandwidth
    name = "5 batch-1 decode, --enforce-eager" if enforce_eager else "4 batch-1 decode, CUDA graphs"
    fraction = roofline / per_token
    detail = (
        f"{1 / per_token:.0f} tok/s ({per_token * 1e3:.2f} ms/token); roofline {roofline * 1e3:.2f} ms "
        f"({weight_bytes / 1e9:.1f} GB at {bandwidth / 1e12:.2f} TB/s): {fraction:.0%}"
    )
    if enforce_eager:  # what the graphs buy, not a goal of its own
        verdict = "-"
        if "graphs" in BATCH1_SECONDS:
            detail += f"; CUDA graphs make a token {per_token / BATCH1_SECONDS['graphs']:.1f}x faster"
    else:
        BATCH1_SECONDS["graphs"] = per_token
        verdict = "PASS" if fraction >= 0.7 else "BELOW GOAL"
        detail += " (goal 70%)"
        try:  # diagnostics, printed above the table
            print_top_kernels(llm, args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    graphs = llm.engine.core.runner.decode_graphs
    if graphs is not None and 1 in graphs.graphs:
        try:  # diagnostics: the measurement above stands if they fail
            detail += "; " + explain_batch1_decode(llm, graphs, per_token, num_decode, args)
        except Exception as error:  # noqa: BLE001
            detail += f"; breakdown failed: {error!r}"
    record(name, verdict, detail)


def print_top_kernels(llm: Any, args: argparse.Namespace) -> None:
    """The kernels of one 129-token batch-1 generation, most device time first (CPU ops without CUDA):
    whether a token's time is in the matrix-vector products, the attention or the small ops, and how
    many launches each holds, for the next change when row 4 is short."""
    from torch.profiler import ProfilerActivity, profile

    from tokenmill import SamplingParams

    activity = ProfilerActivity.CUDA if args.device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        params = SamplingParams(temperature=0, max_tokens=129, ignore_eos=True)
        llm.generate(BATCH1_PROMPT, params, use_tqdm=False)
        sync(args)
    sort_by = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print("[gpu_check] check 4's kernels, 1 prefill + 128 decode steps:", flush=True)
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=70), flush=True)


def decode_seconds_per_token(llm: Any, num_decode: int, args: argparse.Namespace) -> float:
    """Seconds per decoded token of one 128-token prompt (prefill and warm-up excluded)."""
    from tokenmill import SamplingParams

    llm.generate(BATCH1_PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    timings = []
    for max_tokens in (1, num_decode + 1):
        sync(args)
        start = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(BATCH1_PROMPT, params, use_tqdm=False)
        sync(args)
        timings.append(time.perf_counter() - start)
    return (timings[1] - timings[0]) / num_decode


def explain_batch1_decode(
    llm: Any, graphs: Any, per_token: float, num_decode: int, args: argparse.Namespace
) -> str:
    """Where a token's time goes: the forward pass alone (graph replay), and what turning off async
    scheduling, then the Triton layer ops (graphs captured again with eager small ops), costs."""
    from tokenmill.kernels import gpu

    core = llm.engine.core
    forward = graph_replay_seconds(graphs.graphs[1], 100 if not args.smoke else 5)
    parts = [
        f"forward pass alone (graph replay) {forward * 1e3:.2f} ms, the LM head, sampling and host work "
        f"{(per_token - forward) * 1e3:.2f} ms"
    ]
    num_decode = min(num_decode, 128)  # diagnostics: enough tokens for a steady per-token figure
    core.async_scheduling = False
    parts.append(f"without async scheduling {decode_seconds_per_token(llm, num_decode, args) * 1e3:.2f} ms")
    core.async_scheduling = True
    with environment({gpu.LAYER_OPS_ENV: "0"}):
        graphs.capture()
        eager_ops = decode_seconds_per_token(llm, num_decode, args)
    parts.append(f"with eager RMSNorm/rotary/SiLU {eager_ops * 1e3:.2f} ms")
    return "; ".join(parts)


def graph_replay_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Seconds per replay of a captured decode graph, back to back: the step's GPU time without the host."""
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays
