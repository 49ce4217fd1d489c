"""The Triton kernels compile for an H100 (sm_90) without a GPU: triton's own compiler and ptxas.

The interpreter tests check the arithmetic but accept some programs the compiler rejects (mixed loop
bound types, unsupported ops); this catches those in CI. The constexprs mirror what the launchers pass
for real model shapes. Compiling needs a process where triton was imported without TRITON_INTERPRET (its
standard library is decorated at import), so the test runs this file as a script in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenmill.attention.triton_interpret import interpret_without_cuda

if __name__ != "__main__":
    # In pytest, the process may run the other tests' interpreted kernels: whoever imports triton first
    # must have set TRITON_INTERPRET. The script run below compiles, so it must not.
    interpret_without_cuda()
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tokenmill.attention import triton_decode, triton_kv_write, triton_prefill  # noqa: E402
from tokenmill.kernels import triton_layer_ops  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="triton without its NVIDIA backend")
def test_kernels_compile_for_h100() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    script = [sys.executable, "-W", "error", __file__]
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled") == 16, result.stdout


def compile_for_h100(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> Any:
    fn = JITFunction(kernel.fn)  # the plain function, whatever wrapper the module holds
    signature = {
        name: "constexpr"
        if name in constexprs
        else pointers.get(name, "fp32" if name.startswith("scale") else "i32")
        for name in fn.arg_names
    }
    keyed = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    options = {"num_warps": 4, "enable_fp_fusion": True}
    compiled = triton.compile(ASTSource(fn, signature, keyed), target=H100, options=options)
    print("compiled", fn.__name__, sorted(constexprs.items()))
    return compiled


def kv_write_compiles(dtype: str, num_kv_heads: int, head_dim: int) -> None:
    pointers = {
        "key_ptr": f"*{dtype}",
        "value_ptr": f"*{dtype}",
        "cache_ptr": f"*{dtype}",
        "slot_ptr": "*i64",
    }
    constexprs = {
        "NUM_KV_HEADS": num_kv_heads,
        "HEAD_DIM": head_dim,
        "HEADS_PAD": triton.next_power_of_2(num_kv_heads),
        "DIM_PAD": head_dim,
        "BLOCK_SIZE": 16,
    }
    compile_for_h100(triton_kv_write._write_kv_kernel, pointers, constexprs)


def decode_compiles(dtype: str, group_size: int, head_dim: int, num_splits: int) -> None:
    out = f"*{dtype}" if num_splits == 1 else "*fp32"
    pointers = {"q_ptr": f"*{dtype}", "cache_ptr": f"*{dtype}", "out_ptr": out, "lse_ptr": out}
    pointers |= {"block_table_ptr": "*i64", "seq_lens_ptr": "*i64"}
    constexprs = {
        "GROUP_SIZE": group_size,
        "HEAD_DIM": head_dim,
        "BLOCK_H": 16,
        "DIM_PAD": head_dim,
        "BLOCK_N": 64,
        "BLOCK_SIZE": 16,
        "DOT_PRECISION": None,
        "UPCAST_DOTS": False,
        "STORE_LSE": num_splits > 1,
    }
    compile_for_h100(triton_decode._decode_kernel, pointers, constexprs)
    if num_splits > 1:
        merge = {"SPLITS_PAD": triton.next_power_of_2(num_splits), "HEAD_DIM": head_dim, "DIM_PAD": head_dim}
        pointers = {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}"}
        compile_for_h100(triton_decode._merge_splits_kernel, pointers, merge)


def prefill_compiles(dtype: str, group_size: int, head_dim: int) -> None:
    pointers = {"q_ptr": f"*{dtype}", "cache_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    pointers |= {"block_table_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_loc_ptr": "*i32"}
    pointers |= {"tile_seq_ptr": "*i32", "tile_start_ptr": "*i32"}
    group_pad = triton.next_power_of_2(group_size)
    block_q = triton_prefill.tokens_per_tile(group_size, 64)
    constexprs = {
        "GROUP_SIZE": group_size,
        "GROUP_PAD": group_pad,
        "HEAD_DIM": head_dim,
        "DIM_PAD": head_dim,
        "BLOCK_Q": block_q,
        "BLOCK_M": block_q * group_pad,
        "BLOCK_N": 64,
        "BLOCK_SIZE": 16,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else None,
        "UPCAST_DOTS": False,
    }
    compile_for_h100(triton_prefill._prefill_kernel, pointers, constexprs)


def layer_ops_compile(dtype: str, hidden: int, head_dim: int) -> None:
    tensors = ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "summed_ptr")
    pointers = {name: f"*{dtype}" for name in tensors}
    for has_residual in (True, False):
        norm = {"HAS_RESIDUAL": has_residual, "BLOCK": triton.next_power_of_2(hidden)}
        compile_for_h100(triton_layer_ops._rms_norm_kernel, pointers | {"eps": "fp32"}, norm)
    pointers = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    compile_for_h100(triton_layer_ops._silu_and_mul_kernel, pointers, {"BLOCK": 1024})
    pointers |= {"cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}"}
    rotary = {"HALF": head_dim // 2, "HALF_PAD": triton.next_power_of_2(head_dim // 2)}
    compile_for_h100(triton_layer_ops._rotary_kernel, pointers, rotary)


def main() -> None:
    kv_write_compiles("bf16", 8, 128)
    kv_write_compiles("fp16", 3, 64)
    decode_compiles("bf16", 4, 128, 1)
    decode_compiles("fp16", 3, 64, 5)  # with the merge kernel
    prefill_compiles("bf16", 4, 128)
    prefill_compiles("fp16", 7, 64)
    prefill_compiles("fp32", 2, 64)  # float32 models when the Triton backend is forced
    layer_ops_compile("bf16", 4096, 128)
    layer_ops_compile("fp16", 576, 64)


if __name__ == "__main__":
    main()
