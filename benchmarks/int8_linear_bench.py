"""The CPU linear kernels against float32 `F.linear`, on a model's linear shapes, side by side in one run:
int8 (`--quantization int8`, and its dequantize-then-GEMM fallback) and the GGUF block kernel
(`--quantization gguf`) over Q4_1 and Q8_0 weights made from the same random floats.

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
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from tokenmill.kernels import cpu
from tokenmill.model import quantization
from tokenmill.model.gguf_linear import GGUFLinear, pack_rows
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


BLOCK_TYPES = (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


def gguf_layer(weight: torch.Tensor, block_type: GGMLQuantizationType) -> GGUFLinear:
    rows = pack_rows(quantize(weight.numpy(), block_type), block_type)
    block_format = "Q8_0" if block_type == GGMLQuantizationType.Q8_0 else "Q4_1"
    return GGUFLinear(torch.from_numpy(rows), block_format, weight.shape[0], weight.shape[1], None)


def run_gguf(layers: list[list[GGUFLinear]], x: dict[int, torch.Tensor]) -> None:
    for layer in layers:
        for linear in layer:
            linear(x[linear.input_size])


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
    q4s, q8s = (
        [[gguf_layer(w, block_type) for w in layer] for layer in floats] for block_type in BLOCK_TYPES
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers of {shapes}")
    header = ("float32", "int8", "dequant", "Q4_1", "Q8_0")
    print(f"{'rows':>5} " + " ".join(f"{name + ' ms':>10}" for name in header) + "  float/int8 float/Q4_1")
    for rows in args.rows:
        x = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        best = dict.fromkeys(header, float("inf"))
        for _ in range(args.repeats):
            best["float32"] = min(best["float32"], seconds(run_float, floats, x))
            best["int8"] = min(best["int8"], seconds(run_int8, int8s, x, rows))
            best["dequant"] = min(best["dequant"], seconds(run_int8, int8s, x, 0))
            best["Q4_1"] = min(best["Q4_1"], seconds(run_gguf, q4s, x))
            best["Q8_0"] = min(best["Q8_0"], seconds(run_gguf, q8s, x))
        ms = {name: value * 1e3 for name, value in best.items()}
        ratios = f"{ms['float32'] / ms['int8']:>10.2f}x {ms['float32'] / ms['Q4_1']:>8.2f}x"
        print(f"{rows:>5} " + " ".join(f"{ms[name]:>10.1f}" for name in header) + "  " + ratios)


if __name__ == "__main__":
    main()
