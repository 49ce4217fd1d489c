"""The GPU check's checks 1 and 2: the attention kernels against the torch reference, and greedy fidelity
against transformers with no host syncs in a generation (see gpu_check.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from gpu_check_common import PROMPTS, environment, model_dir, record


def check_kernels(args: argparse.Namespace) -> None:
    script = Path(__file__).with_name("attention_check.py")
    if not script.exists() or not torch.cuda.is_available():
        record("1 attention kernels", "SKIP", "no CUDA or no attention_check.py")
        return
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    record("1 attention kernels", "PASS" if proc.returncode == 0 else "FAIL", f"exit {proc.returncode}")


# (row label, dtype, environment): the default path in float32 (SDPA on CUDA; exact), the GPU path in
# float32 (Triton attention and layer ops forced, so CUDA graphs are captured too; exact), and the GPU
# path in bfloat16 (rounding may part the two late: agreement).
FIDELITY_PASSES = [
    ("float32", "float32", {}),
    ("float32, Triton kernels + layer ops + CUDA graphs", "float32",
     {"TOKENMILL_ATTENTION_BACKEND": "triton", "TOKENMILL_TRITON_LAYER_OPS": "1"}),
    ("bfloat16", "bfloat16", {}),
]  # fmt: skip


def check_fidelity(args: argparse.Namespace) -> None:
    from transformers import Qwen3Config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = Qwen3Config(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    directory = model_dir(config, args.tokenizer, weights=True)
    theirs: dict[str, list[list[int]]] = {}
    for label, dtype, env in FIDELITY_PASSES:
        if env and args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            record(
                f"2 greedy vs transformers ({label})", "SKIP", "no CUDA (TRITON_INTERPRET=1 runs it on CPU)"
            )
            continue
        with environment(env):
            ours, prompt_ids = greedy_tokens(directory, dtype, args)
        if dtype not in theirs:
            theirs[dtype] = hf_greedy_tokens(directory, dtype, prompt_ids, args)
        record(f"2 greedy vs transformers ({label})", *fidelity_verdict(ours, theirs[dtype], dtype))
    check_host_syncs(directory, args)


SYNC_CHECK_PARAMS = [
    {"temperature": 0, "logprobs": 2, "prompt_logprobs": 1},
    {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 1},
    {"temperature": 1.0, "repetition_penalty": 1.2, "presence_penalty": 0.3, "min_p": 0.05},
]


def check_host_syncs(directory: Path, args: argparse.Namespace) -> None:
    """A generation on the serving defaults (bfloat16, CUDA graphs, async scheduling) makes no
    synchronizing CUDA call: each step's sampled tokens are read through an event, which torch's sync
    debug mode does not count, and anything else that waits for the device (.item(), .tolist(), a copy
    from pageable memory) is reported with the line that made it."""
    name = "2 no host syncs in a generation"
    if args.device != "cuda":
        record(name, "SKIP", "no CUDA")
        return
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(directory), dtype="bfloat16", max_model_len=512, device=args.device,
              kv_cache_memory=256 << 20)  # fmt: skip
    params = [SamplingParams(max_tokens=16, ignore_eos=True, **p) for p in SYNC_CHECK_PARAMS]
    prompts = PROMPTS[: len(params)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: compilation and lazy initialization
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    detail = f"{len(syncs)} synchronizing calls in 3 requests x 16 tokens (greedy + logprobs + prompt "
    detail += "logprobs, seeded top-k + top-p, penalties + min-p)"
    record(name, "FAIL" if syncs else "PASS", detail + (f", at {', '.join(places[:10])}" if places else ""))
    del llm


def greedy_tokens(
    directory: Path, dtype: str, args: argparse.Namespace
) -> tuple[list[list[int]], list[list[int]]]:
    """tokenmill's 32 greedy tokens for each prompt, and the prompts' token ids."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(directory), dtype=dtype, max_model_len=512, device=args.device, kv_cache_memory=256 << 20)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    prompt_ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    del llm
    return ours, prompt_ids


def hf_greedy_tokens(
    directory: Path, dtype: str, prompt_ids: list[list[int]], args: argparse.Namespace
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).to(args.device).eval()
    theirs = []
    for ids in prompt_ids:
        out = hf.generate(
            torch.tensor([ids], device=args.device), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )
        theirs.append(out[0, len(ids) :].tolist())
    del hf
    return theirs


def fidelity_verdict(ours: list[list[int]], theirs: list[list[int]], dtype: str) -> tuple[str, str]:
    """float32 must match token for token. bfloat16 rounds differently from transformers' kernels, so
    two near-tied logits may part the outputs late; it must agree on every prompt's first token and on
    at least half of all tokens (a wrong kernel disagrees from the first token on)."""
    same = sum(a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True))
    total = sum(len(x) for x in theirs)
    parted = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(y))
              for x, y in zip(ours, theirs, strict=True)]  # fmt: skip
    detail = f"{same}/{total} tokens agree; first difference at {parted} (of 32)"
    if dtype == "float32":
        return ("PASS" if ours == theirs else "FAIL"), detail
    return ("PASS" if min(parted) > 0 and 2 * same >= total else "FAIL"), detail
