"""The GPU check: correctness and speed of every GPU path, in one run that prints a table last.

    PYTHONPATH=. python benchmarks/gpu_check.py --tokenizer DIR      (on a CUDA machine; 6-8 minutes)
    PYTHONPATH=. python benchmarks/gpu_check.py --tokenizer DIR --smoke   (tiny shapes; runs on CPU too)

1. attention kernels vs the torch reference (benchmarks/attention_check.py)
2. greedy fidelity vs transformers: a tiny random-weight Qwen3, float32 (exact) on the default path and
   on the Triton kernels, layer ops and CUDA graphs, and bfloat16 (agreement); and no synchronizing CUDA
   call in a generation on the serving defaults (torch's sync debug mode)
3. the nano-vllm workload: Qwen3-0.6B-shaped random weights, 256 requests, input and output lengths
   uniform in 100-1024, ignore_eos, temperature 0.6, through tokenmill and transformers generate
4. batch-1 decode of a Llama-3.1-8B-shaped model against the roofline (weight bytes / copy bandwidth),
   with where a token's time goes: the graph replay alone, without async scheduling, with eager small ops
5. the same with enforce_eager (no CUDA graphs)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gpu_check_common import phase, print_results, print_table
from gpu_check_fidelity import check_fidelity, check_kernels
from gpu_check_speed import check_batch1_decode, check_nano_workload


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer directory (no hub here)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script itself")
    parser.add_argument("--only", default="12345", help="which checks to run, e.g. 234")
    cut_off_help = "seconds: transformers' generate in check 3 is stopped there (its row gives a lower bound)"
    parser.add_argument("--time-limit", type=float, help=cut_off_help)
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    name = args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"[gpu_check] {when}: torch {torch.__version__} on {name}", flush=True)
    checks = {
        "1": lambda: check_kernels(args),
        "2": lambda: check_fidelity(args),
        "3": lambda: check_nano_workload(args),
        "4": lambda: check_batch1_decode(args, enforce_eager=False),
        "5": lambda: check_batch1_decode(args, enforce_eager=True),
    }
    for key in args.only:
        phase(f"check {key}", checks[key])
        print_table(name)  # after every check: a run cut short by its time limit keeps the rows so far
    print_results(name)


if __name__ == "__main__":
    main()
