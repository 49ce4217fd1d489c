"""The int8 CPU kernel against float32 `F.linear` and against the dequantize-then-GEMM fallback, on one
decoder's worth of a model's linear shapes, side by side in one run.

    python benchmarks/int8_linear_bench.py                      # SmolLM2-135M's shapes, 30 layers
    python benchmarks/int8_linear_bench.py --hidden 2048 --intermediate 8192 --kv 512 --layers 4

Each row is the time for every layer's QKV, output, gate/up and down projections at that many rows
(tokens), best of --repeats; the paths alternate within each repetition so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu
from tokenmill.model import quantization
from tokenmill.model.quantization import Int8Linear


def layer_shapes(hidden: int, intermediate: int, kv: int) -> list[tuple[int, int]]:
    return [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]


def run_float(layers: list[list[torch.Tensor]], x: dict[int, torch.Tensor]) -> None:
    for layer in layers:
        for weight in layer:
            F.linear(x[weight.shape[1]], weight)


def run_int8(layers: list[list[Int8Linear]], x: dict[int, torch.Tensor], max_kernel_rows: int) -> None:
    saved, quantization.MAX_KERNEL_ROWS = quantization.MAX_KERNEL_ROWS, max_kernel_rows
    try:
        for layer in layers:
            for linear in layer:
                linear(x[linear.input_size])
    finally:
        quantization.MAX_KERNEL_ROWS = saved


def seconds(fn: Callable[..., None], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="num_kv_heads * head_dim")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if cpu.kernel_library() is None:
        raise SystemExit("the int8 kernel cannot run here (the warning above says why)")

    torch.manual_seed(0)
    shapes = layer_shapes(args.hidden, args.intermediate, args.kv)
    floats = [[torch.randn(n, k) * 0.05 for n, k in shapes] for _ in range(args.layers)]
    int8s = [[Int8Linear(w, None) for w in layer] for layer in floats]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers of {shapes}")
    print(f"{'rows':>5} {'float32 ms':>11} {'kernel ms':>10} {'dequant ms':>11} {'float/kernel':>13}")
    for rows in args.rows:
        x = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        best = {"float": float("inf"), "kernel": float("inf"), "dequant": float("inf")}
        for _ in range(args.repeats):
            best["float"] = min(best["float"], seconds(run_float, floats, x))
            best["kernel"] = min(best["kernel"], seconds(run_int8, int8s, x, rows))
            best["dequant"] = min(best["dequant"], seconds(run_int8, int8s, x, 0))
        ms = {name: value * 1e3 for name, value in best.items()}
        print(
            f"{rows:>5} {ms['float']:>11.1f} {ms['kernel']:>10.1f} {ms['dequant']:>11.1f}"
            f" {ms['float'] / ms['kernel']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
