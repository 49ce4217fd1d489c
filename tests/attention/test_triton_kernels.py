"""Each Triton attention kernel against the plain-torch reference.

Without CUDA the kernels run in triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)
on small float32 and float16 shapes; with CUDA they are compiled and checked in fp16 and bf16, plus the
larger gpu-marked shapes at the end.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tokenmill.attention.triton_interpret import interpret_without_cuda

INTERPRETED = interpret_without_cuda()  # before triton is imported
triton = pytest.importorskip("triton")

from tokenmill.attention.cpu import TorchSDPABackend  # noqa: E402
from tokenmill.attention.reference import (  # noqa: E402
    PagedBatch,
    ReferenceBackend,
    random_paged_batch,
    reference_paged_attention,
    reference_write_kv_cache,
)
from tokenmill.attention.triton_backend import TritonBackend  # noqa: E402
from tokenmill.attention.triton_decode import MAX_SPLITS, choose_num_splits, paged_decode_attention  # noqa: E402
from tokenmill.attention.triton_kv_write import write_kv_cache  # noqa: E402
from tokenmill.attention.triton_prefill import build_prefill_tiles, paged_prefill_attention  # noqa: E402

if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# On a GPU the half-precision types the selector gives these kernels; in the interpreter float32 too (the
# end-to-end tests' type, test_triton_engine.py), bfloat16 with its products in float32 (upcast_dots).
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if INTERPRETED else [torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_batch(
    seqs: list[tuple[int, int]], shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0
) -> PagedBatch:
    num_heads, num_kv_heads, head_dim, block_size = shape
    return random_paged_batch(
        seqs, num_heads, num_kv_heads, head_dim, block_size, dtype=dtype, device=DEVICE, seed=seed
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def reference_output(batch: PagedBatch) -> torch.Tensor:
    """The step's attention output, with the step's K/V written into batch.kv_cache by the reference."""
    reference_write_kv_cache(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    return reference_paged_attention(batch.query, batch.kv_cache, batch.metadata, batch.scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_cache_fills_each_slot_and_skips_negative_ones(dtype: torch.dtype) -> None:
    batch = make_batch([(0, 5), (13, 7), (30, 1)], (4, 2, 32, 16), dtype)
    batch.metadata.slot_mapping[3] = -1  # a padding row
    expected = batch.kv_cache.clone()
    reference_write_kv_cache(batch.key, batch.value, expected, batch.metadata.slot_mapping)
    write_kv_cache(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    assert torch.equal(batch.kv_cache, expected)


DECODE_SEQS = [(0, 1), (16, 1), (40, 1), (77, 1)]  # lengths 1, 17, 41, 78: within, at and across blocks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "num_splits"),  # shape: (num_heads, num_kv_heads, head_dim, block_size)
    [
        ((4, 2, 32, 16), 1),
        ((4, 2, 32, 16), 3),  # splits need not be a power of two; short sequences leave splits empty
        ((8, 1, 16, 8), 4),  # multi-query, small blocks
        ((2, 2, 40, 32), 2),  # no grouping, padded head_dim, a cache block wider than a key tile
    ],
    ids=["gqa", "gqa_3_splits", "mqa_small_blocks", "mha_padded_dim"],
)
def test_decode_matches_reference(
    shape: tuple[int, int, int, int], num_splits: int, dtype: torch.dtype
) -> None:
    batch = make_batch(DECODE_SEQS, shape, dtype)
    expected = reference_output(batch)
    meta = batch.metadata
    out = paged_decode_attention(
        batch.query, batch.kv_cache, meta.block_tables, meta.seq_lens, batch.scale, num_splits, block_n=16
    )
    assert_close(out, expected)


PREFILL_CASES = {
    "prefill": ([(0, 5), (0, 23)], (4, 2, 32, 16)),
    "prefix_hits": ([(16, 9), (5, 12), (32, 1)], (6, 2, 32, 16)),  # group of 3 heads, padded to 4
    "mixed_decode_and_prefill": ([(30, 1), (0, 7), (16, 20), (3, 1)], (4, 2, 32, 16)),
    "multi_query_small_blocks": ([(9, 6), (0, 3)], (4, 1, 16, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case: str, dtype: torch.dtype) -> None:
    seqs, shape = PREFILL_CASES[case]
    batch = make_batch(seqs, shape, dtype)
    expected = reference_output(batch)
    meta = batch.metadata
    group_size = shape[0] // shape[1]
    tiles = build_prefill_tiles(meta.query_start_loc, group_size, DEVICE, block_m=16)
    out = paged_prefill_attention(
        batch.query, batch.kv_cache, meta.block_tables, meta.seq_lens, tiles, batch.scale, block_n=16
    )
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seqs",
    [[(600, 1), (37, 1)], [(20, 1), (0, 9), (40, 6)]],
    ids=["decode_only_split", "mixed"],
)
def test_backend_matches_reference_backend(seqs: list[tuple[int, int]], dtype: torch.dtype) -> None:
    batch = make_batch(seqs, (4, 2, 32, 16), dtype)
    expected_cache = batch.kv_cache.clone()
    expected = ReferenceBackend().forward(
        batch.query, batch.key, batch.value, expected_cache, batch.metadata, batch.scale
    )
    backend = TritonBackend(num_sms=4, fp32_kernels=INTERPRETED)
    out = backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, batch.scale)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out, expected)
    if seqs[0] == (600, 1):
        assert backend._plan is not None and backend._plan.num_splits == 2


def test_backend_decode_with_graph_style_upper_bounds() -> None:
    """CUDA-graph metadata: host context_lens are upper bounds, seq_lens on the device are the truth."""
    batch = make_batch([(40, 1), (3, 1)], (4, 2, 16, 16), DTYPES[0])
    expected = reference_output(replace(batch, kv_cache=batch.kv_cache.clone()))
    graph_style = replace(batch.metadata, context_lens=[999, 999], decode_only=True)
    backend = TritonBackend(num_sms=4, fp32_kernels=INTERPRETED)
    out = backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, graph_style, batch.scale)
    assert backend._plan is not None and backend._plan.num_splits == 2
    assert_close(out, expected)


@pytest.mark.parametrize("seqs", [[(20, 1), (33, 1)], [(20, 1), (5, 11)]], ids=["decode", "mixed"])
def test_backend_reads_a_strided_block_table(seqs: list[tuple[int, int]]) -> None:
    batch = make_batch(seqs, (4, 2, 16, 8), DTYPES[0])
    expected = reference_output(replace(batch, kv_cache=batch.kv_cache.clone()))
    table = batch.metadata.block_tables
    wide = torch.full((table.shape[0], 2 * table.shape[1]), -1, dtype=table.dtype, device=DEVICE)
    wide[:, ::2] = table
    strided = replace(batch.metadata, block_tables=wide[:, ::2])
    backend = TritonBackend(fp32_kernels=INTERPRETED)
    out = backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, strided, batch.scale)
    assert_close(out, expected)


def test_backend_plans_once_per_step() -> None:
    batch = make_batch([(3, 4), (0, 2)], (4, 2, 16, 16), DTYPES[0])
    backend = TritonBackend(fp32_kernels=INTERPRETED)
    plans = []
    for _ in range(2):  # two layers of one step
        backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, batch.scale)
        plans.append(backend._plan)
    assert plans[0] is not None and plans[0] is plans[1]


def test_float32_goes_to_sdpa_unless_asked() -> None:
    batch = make_batch([(5, 1), (0, 4)], (4, 2, 16, 16), torch.float32)
    sdpa_cache = batch.kv_cache.clone()
    expected = TorchSDPABackend().forward(
        batch.query, batch.key, batch.value, sdpa_cache, batch.metadata, batch.scale
    )
    backend = TritonBackend()
    out = backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, batch.scale)
    assert backend._plan is None
    assert torch.equal(out, expected)


def test_choose_num_splits() -> None:
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=100, num_sms=132) == 1
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 1
    long_single = choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, num_sms=132)
    assert 1 < long_single <= MAX_SPLITS and long_single & (long_single - 1) == 0


# --- Larger shapes, compiled only ------------------------------------------------------------------------

compiled_only = pytest.mark.skipif(INTERPRETED, reason="needs CUDA (compiled kernels)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 8, 32])
@pytest.mark.gpu
@compiled_only
def test_long_context_decode_gqa_on_gpu(num_splits: int, dtype: torch.dtype) -> None:
    batch = make_batch([(4095, 1), (8191, 1), (100, 1)], (32, 8, 128, 16), dtype, seed=1)
    expected = reference_output(batch)
    meta = batch.metadata
    out = paged_decode_attention(
        batch.query, batch.kv_cache, meta.block_tables, meta.seq_lens, batch.scale, num_splits
    )
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.gpu
@compiled_only
def test_chunked_prefill_with_prefix_on_gpu(dtype: torch.dtype) -> None:
    batch = make_batch([(1000, 300), (0, 517), (2047, 1), (64, 64)], (32, 8, 128, 16), dtype, seed=2)
    cache = batch.kv_cache.clone()
    expected = reference_output(batch)
    out = TritonBackend().forward(batch.query, batch.key, batch.value, cache, batch.metadata, batch.scale)
    assert torch.equal(cache, batch.kv_cache)
    assert_close(out, expected)
