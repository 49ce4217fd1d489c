"""The plain-torch reference against the SDPA backend, and against attention written out by hand."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.cpu import TorchSDPABackend, gather_kv
from tokenmill.attention.reference import (
    ReferenceBackend,
    random_paged_batch,
    reference_gather_kv,
    reference_sequence_attention,
)
from tokenmill.kernels import cpu
from tokenmill.loader.dtype import resolve_kv_cache_dtype

CASES = {
    "prefill": [(0, 5), (0, 23)],
    "decode": [(0, 1), (16, 1), (40, 1)],
    "prefix_hits_and_decode": [(30, 1), (16, 9), (0, 7), (5, 12)],
}
# The C kernel gives each sequence one task when there are enough of them, else one per KV head (and its
# group of query heads), as for one sequence.
KERNEL_CASES = {
    "many_decodes": [(length, 1) for length in (0, 3, 7, 8, 15, 16, 31, 40, 47, 64)],
    "one_decode": [(40, 1)],
    # The prefill kernel takes 16 queries and 16 keys per tile: prompts past a tile, alone and after context.
    "long_prefills": [(0, 40), (23, 33), (0, 16), (7, 1)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (6, 2), (4, 1), (2, 2)])
def test_reference_backend_matches_sdpa_backend(case: str, num_heads: int, num_kv_heads: int) -> None:
    batch = random_paged_batch(CASES[case], num_heads, num_kv_heads, head_dim=16, block_size=8)
    sdpa_cache = batch.kv_cache.clone()
    expected = TorchSDPABackend().forward(
        batch.query, batch.key, batch.value, sdpa_cache, batch.metadata, batch.scale
    )
    out = ReferenceBackend().forward(
        batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, batch.scale
    )
    assert torch.equal(batch.kv_cache, sdpa_cache)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_backend_plans_once_per_step() -> None:
    """The backend keeps one decode plan per step's metadata for all layers; a new step gets a new one."""
    backend = TorchSDPABackend()
    for seed, case in enumerate(["decode", "prefix_hits_and_decode", "decode"]):
        torch.manual_seed(seed)
        batch = random_paged_batch(CASES[case], 4, 2, head_dim=16, block_size=8)
        expected = ReferenceBackend().forward(
            batch.query, batch.key, batch.value, batch.kv_cache.clone(), batch.metadata, batch.scale
        )
        for _layer in range(2):
            out = backend.forward(
                batch.query, batch.key, batch.value, batch.kv_cache.clone(), batch.metadata, batch.scale
            )
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
@pytest.mark.parametrize(
    "case", ["decode", "prefix_hits_and_decode", "many_decodes", "one_decode", "long_prefills"]
)
# Query heads per KV head 2, 3, 4 and 8: the kernel takes them 3 at a time (tiles of 3, 3 + 1, 3 + 3 + 2).
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (6, 2), (4, 1), (2, 2), (8, 1)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("head_dim", [16, 72])  # 72: two 32-feature passes of the weighted sum and a rest
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_c_attention_kernels_match_the_torch_path(
    case: str, num_heads: int, num_kv_heads: int, strided: bool, head_dim: int, cache_dtype: torch.dtype
) -> None:
    """The C decode kernel reads each sequence's blocks in place (and, in a decode-only step, writes the new
    keys and values itself, rounding to the cache's half type as torch does); the torch path writes
    with index_copy_, gathers the blocks and pads. Prefill rows take the C prefill kernel or SDPA."""
    torch.manual_seed(0)
    lengths = KERNEL_CASES[case] if case in KERNEL_CASES else CASES[case]
    batch = random_paged_batch(lengths, num_heads, num_kv_heads, head_dim=head_dim, block_size=8)
    query, key, value = batch.query, batch.key, batch.value
    if strided:  # as the model passes them: views into one [q | k | v] row per token
        qkv = torch.cat([query, key, value], dim=1)
        query, key, value = qkv[:, :num_heads], qkv[:, num_heads:-num_kv_heads], qkv[:, -num_kv_heads:]
    caches = [batch.kv_cache.to(cache_dtype) for _ in range(2)]
    outputs = [
        TorchSDPABackend(use_kernel=use_kernel).forward(query, key, value, cache, batch.metadata, batch.scale)
        for use_kernel, cache in zip((True, False), caches, strict=True)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[0], caches[1])


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("context_len", "query_len"), [(0, 40), (23, 33), (0, 1), (45, 3)])
def test_the_prefill_kernel_over_the_blocks_equals_it_over_gathered_floats(
    cache_dtype: torch.dtype, context_len: int, query_len: int
) -> None:
    """Read where the keys and values lie (blocks in a random order, the last one part full) and converted
    as they are transposed, a prompt chunk attends exactly as over its gathered float32 keys and values."""
    batch = random_paged_batch([(context_len, query_len)], 6, 2, head_dim=24, block_size=8, seed=context_len)
    cache = batch.kv_cache.to(cache_dtype)
    library = cpu.kernel_library()
    assert library is not None
    seq_len = context_len + query_len
    key, value = (x.float() for x in gather_kv(cache, batch.metadata.block_tables[0], seq_len))
    expected = cpu.prefill_attention(library, batch.query, key, value, batch.scale)
    out = torch.full_like(expected, float("nan"))
    table = batch.metadata.block_tables[0]
    cpu.prefill_attention_paged(library, batch.query, cache, table, seq_len, batch.scale, out)
    assert torch.equal(out, expected)


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_the_c_cache_write_rounds_as_torch_does(cache_dtype: torch.dtype) -> None:
    """Ties (to even), the largest finite floats (overflowing to infinity), infinities, subnormals and signed
    zeros, in both the 8-wide loop and the scalar rest: the kernel's half is torch's `.to()` bit for bit.
    NaN stays NaN (torch's own bits for it differ between its vector and scalar conversions)."""
    specials = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 3.4e38, -3.4e38, 65519.0, 65520.0]
    specials += [math.inf, -math.inf, math.nan, 1e-40, -1e-40, 0.0, -0.0, 6e-8]
    values = torch.tensor(specials + torch.randn(100).mul(1e3).tolist(), dtype=torch.float32)
    for width in (4, 8):  # a row of 4 elements: the scalar rest only; of 8: the vector loop only
        key = values[: len(values) // width * width].view(-1, 1, width)
        kv_cache = torch.zeros(2, 1, key.shape[0], 1, width, dtype=cache_dtype)
        cpu.write_kv_cache(cpu.kernel_library(), key, key.neg(), kv_cache, torch.arange(key.shape[0]))
        for written, source in zip(kv_cache.flatten(1).unbind(), (key, key.neg()), strict=True):
            expected = source.flatten().to(cache_dtype)
            assert torch.equal(written.isnan(), expected.isnan())
            finite = ~expected.isnan()
            assert torch.equal(written[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_gather_matches_cpu_backend_on_a_permuted_table() -> None:
    batch = random_paged_batch([(3, 2), (21, 19)], 4, 2, head_dim=8, block_size=4)
    table = batch.metadata.block_tables[1]
    expected = gather_kv(batch.kv_cache, table, 40)
    actual = reference_gather_kv(batch.kv_cache, table.tolist(), 40)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def test_sequence_attention_matches_scalar_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 8, generator=generator)  # positions 3 and 4 of a 5-token sequence
    key = torch.randn(5, 2, 8, generator=generator)
    value = torch.randn(5, 2, 8, generator=generator)
    out = reference_sequence_attention(query, key, value, scale=0.3)
    for t, position in enumerate((3, 4)):
        for head in range(4):
            kv_head = head // 2
            scores = [0.3 * float(query[t, head] @ key[j, kv_head]) for j in range(position + 1)]
            weights = [math.exp(s - max(scores)) for s in scores]
            expected = sum(w * value[j, kv_head] for j, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(out[t, head], expected, atol=1e-5, rtol=1e-5)


def test_random_batch_places_each_new_token_in_its_own_block_slot() -> None:
    batch = random_paged_batch([(5, 3), (0, 4)], 2, 1, head_dim=4, block_size=4, seed=3)
    meta = batch.metadata
    assert meta.query_start_loc == [0, 3, 7] and meta.seq_lens.tolist() == [8, 4]
    assert len(set(meta.slot_mapping.tolist())) == 7
    used = meta.block_tables[meta.block_tables > 0].tolist()
    assert len(set(used)) == len(used) == 3  # blocks 1.. are handed out once; 0 only pads
    assert meta.slot_mapping[0] == meta.block_tables[0, 1] * 4 + 1  # position 5 = block 1, offset 1


@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_float16_cache_attends_like_the_float32_one(use_kernel: bool) -> None:
    """Keys and values rounded once to float16 (relative error 2^-11) move the outputs by about as much."""
    torch.manual_seed(0)
    batch = random_paged_batch(CASES["prefix_hits_and_decode"], 4, 2, head_dim=16, block_size=8)
    backend = TorchSDPABackend(use_kernel=use_kernel)
    args = (batch.query, batch.key, batch.value)
    exact = backend.forward(*args, batch.kv_cache.clone(), batch.metadata, batch.scale)
    half_cache = batch.kv_cache.to(torch.float16)
    halved = backend.forward(*args, half_cache, batch.metadata, batch.scale)
    assert halved.dtype == torch.float32 and half_cache.dtype == torch.float16
    torch.testing.assert_close(halved, exact, atol=3e-3, rtol=3e-3)
    assert not torch.equal(halved, exact)  # the cache did hold float16 values


def _first_row_alone(metadata: AttentionMetadata) -> AttentionMetadata:
    """A decode step's first sequence as a step of its own (same blocks, same slot)."""
    return dataclasses.replace(
        metadata,
        slot_mapping=metadata.slot_mapping[:1],
        block_tables=metadata.block_tables[:1],
        seq_lens=metadata.seq_lens[:1],
        query_start_loc=[0, 1],
        query_lens=[1],
        context_lens=metadata.context_lens[:1],
    )


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
def test_a_bfloat16_models_attention_runs_in_float32_through_the_kernels() -> None:
    """bfloat16 queries, keys and values over the bfloat16 cache (auto for bfloat16 models) go to the C
    kernels as float32; the output comes back in bfloat16."""
    torch.manual_seed(0)
    batch = random_paged_batch(CASES["prefix_hits_and_decode"], 4, 2, head_dim=16, block_size=8)
    half = [x.bfloat16() for x in (batch.query, batch.key, batch.value)]
    cache = batch.kv_cache.to(resolve_kv_cache_dtype("auto", torch.bfloat16, "cpu", None))
    backend = TorchSDPABackend()
    out = backend.forward(*half, cache.clone(), batch.metadata, batch.scale)
    upcast = backend.forward(*(x.float() for x in half), cache.clone(), batch.metadata, batch.scale)
    assert out.dtype == torch.bfloat16 and torch.equal(out, upcast.bfloat16())


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
def test_a_bfloat16_decode_rows_output_does_not_depend_on_its_batch() -> None:
    """With the cache a bfloat16 model gets on CPU (bfloat16). The torch path pads a step's decode rows to
    its longest, and in bfloat16 that changed a row's result; the C kernel attends in float32."""
    torch.manual_seed(0)
    lengths = [(37, 1), (3, 1), (250, 1), (17, 1), (120, 1)]
    batch = random_paged_batch(lengths, 9, 3, head_dim=64, block_size=16)
    half = [x.bfloat16() * 4 for x in (batch.query, batch.key, batch.value)]
    cache = (batch.kv_cache * 4).to(resolve_kv_cache_dtype("auto", torch.bfloat16, "cpu", None))
    backend = TorchSDPABackend()
    in_batch = backend.forward(*half, cache.clone(), batch.metadata, batch.scale)
    alone_metadata = _first_row_alone(batch.metadata)
    alone = backend.forward(*(x[:1] for x in half), cache.clone(), alone_metadata, batch.scale)
    assert torch.equal(alone[0], in_batch[0])


def _prompt_in_two_chunks(metadata: AttentionMetadata, split: int) -> list[AttentionMetadata]:
    """One prompt's prefill step as two: positions [0, split), then the rest after them as context."""
    total = metadata.query_lens[0]
    chunk = functools.partial(dataclasses.replace, metadata, computes_prompt=[True])
    return [
        chunk(
            slot_mapping=metadata.slot_mapping[:split],
            seq_lens=metadata.seq_lens.new_tensor([split]),
            query_start_loc=[0, split],
            query_lens=[split],
            context_lens=[0],
        ),
        chunk(
            slot_mapping=metadata.slot_mapping[split:],
            query_start_loc=[0, total - split],
            query_lens=[total - split],
            context_lens=[split],
        ),
    ]


@pytest.mark.skipif(cpu.kernel_library() is None, reason="no C attention kernel here")
@pytest.mark.parametrize(
    ("model_dtype", "cache_dtype"),
    [
        (torch.float32, torch.float16),
        (torch.bfloat16, None),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_a_chunked_prefill_attends_as_the_whole_one(
    model_dtype: torch.dtype, cache_dtype: torch.dtype | None
) -> None:
    """A later chunk (or a prefix-cache hit) reads the first chunk's keys and values from the cache; a whole
    prefill attends over its own, which must be rounded to the cache's dtype first: a half cache (float16 for
    quantized float32 models; bfloat16 models: None here, their auto) otherwise gave other outputs. (The torch
    path, where the C kernels do not run, is close but not equal: SDPA blocks a 40-query prompt differently
    from chunks of 17 and 23.)"""
    torch.manual_seed(0)
    batch = random_paged_batch([(0, 40)], 6, 2, head_dim=16, block_size=8)
    cache_dtype = cache_dtype or resolve_kv_cache_dtype("auto", model_dtype, "cpu", None)
    query, key, value = (x.to(model_dtype) for x in (batch.query, batch.key, batch.value))
    backend = TorchSDPABackend()
    whole = backend.forward(query, key, value, batch.kv_cache.to(cache_dtype), batch.metadata, batch.scale)
    for split in (17, 39):  # 39: the prompt's last token alone, attending as in the whole prefill
        cache = batch.kv_cache.to(cache_dtype)
        rows = [slice(0, split), slice(split, 40)]
        outputs = [
            backend.forward(query[r], key[r], value[r], cache, metadata, batch.scale)
            for r, metadata in zip(rows, _prompt_in_two_chunks(batch.metadata, split), strict=True)
        ]
        assert torch.equal(torch.cat(outputs), whole), f"split at {split}"


def test_a_one_token_prompt_chunk_is_a_prefill_row_and_a_generated_token_a_decode_row() -> None:
    batch = random_paged_batch([(7, 1), (7, 1), (0, 5)], 4, 2, head_dim=16, block_size=8)
    metadata = dataclasses.replace(batch.metadata, computes_prompt=[True, False, True])
    assert metadata.decode_rows() == [1]
    assert batch.metadata.decode_rows() == [0, 1]  # without the flags: by query length
