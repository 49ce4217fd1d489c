"""Attention over the paged KV cache on CPU (any device works with the torch path).

Decode rows (one query token, a generated one) go through our C kernel (kernels/paged_attention.c), which
reads each sequence's blocks in place, where it runs (x86 with AVX2: float32 queries, which a bfloat16 model's
become, over a float32, float16 or bfloat16 cache); otherwise they are gathered and computed as one padded
SDPA batch (benchmarks/RESULTS.md has the kernel's end-to-end gains). In a decode-only step the kernel also
writes the step's keys and values, one call per layer. Prefill rows (prompt tokens, possibly after cached
context; a chunk of one token too, so that a prompt's tokens attend alike however its prefill is chunked) run
one sequence at a time, causal with the context's offset: through our C kernel (kernels/prefill_attention.c),
which reads the sequence's keys and values from its blocks once this step's are written, where it runs, else
through SDPA.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.kernels import cpu as kernels
from tokenmill.kernels.cpu import kernel_library, paged_decode_attention

KERNEL_CACHE_DTYPES = tuple(kernels.KV_FORMATS)  # what the C kernels read and write (float32 queries)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    library = _kv_write_kernel(key, value, kv_cache, slots)
    if library is not None:  # one call instead of two index_copy_ (a third of a decode layer's attention)
        kernels.write_kv_cache(library, key, value, kv_cache, slots)
        return
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(kv_cache.dtype))


def _kv_write_kernel(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> ctypes.CDLL | None:
    applies = (
        key.device.type == "cpu"
        and key.dtype == value.dtype == torch.float32
        and kv_cache.dtype in KERNEL_CACHE_DTYPES
        and kernels.heads_contiguous(key)
        and kernels.heads_contiguous(value)
        and slots.dtype == torch.int64
        and slots.is_contiguous()
    )
    return kernel_library() if applies else None


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached keys and values: [seq_len, num_kv_heads, head_dim] each, in the cache's dtype."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = (seq_len + block_size - 1) // block_size
    table = block_table[:num_blocks]
    key = kv_cache[0].index_select(0, table).view(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1].index_select(0, table).view(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


@dataclass
class _DecodePlan:
    """A step's decode rows and what every layer needs to attend over their blocks: built by the first
    layer, reused by the others (it depends on the metadata only)."""

    metadata: AttentionMetadata
    rows: list[int]  # sequences that decode (one query token, a generated one)
    token_index: torch.Tensor | None  # their rows in the batch; None when they are all of it, in order
    flat_table: torch.Tensor  # [len(rows) * num_blocks] their block tables, cut to the longest
    max_len: int
    mask: torch.Tensor  # [len(rows), 1, 1, max_len] True where a key position exists
    tables: torch.Tensor  # [len(rows), max_blocks] their block tables, for the C kernel
    lengths: torch.Tensor  # [len(rows)] their lengths after this step

    @classmethod
    def build(cls, metadata: AttentionMetadata, block_size: int, device: torch.device) -> _DecodePlan:
        rows = metadata.decode_rows()
        token_idx = [metadata.query_start_loc[i] for i in rows]
        everything = len(rows) == len(metadata.query_lens) and token_idx == list(range(len(rows)))
        token_index = None if everything else torch.tensor(token_idx, device=device)
        max_len = max((metadata.context_lens[i] + 1 for i in rows), default=0)
        num_blocks = (max_len + block_size - 1) // block_size
        tables, lengths = metadata.block_tables[rows], metadata.seq_lens[rows]
        flat_table = tables[:, :num_blocks].flatten()
        mask = torch.arange(max_len, device=device)[None, :] < lengths[:, None]
        return cls(metadata, rows, token_index, flat_table, max_len, mask[:, None, None, :], tables, lengths)


class TorchSDPABackend:
    supports_cuda_graphs = False  # reads per-sequence lengths from the host lists

    def __init__(self, use_kernel: bool = True) -> None:
        self.use_kernel = use_kernel  # False: always the torch path (tests compare the two)
        self._plan: _DecodePlan | None = None

    def _decode_plan(self, metadata: AttentionMetadata, block_size: int, device: torch.device) -> _DecodePlan:
        # Holding the metadata keeps its identity unique while the plan is cached.
        if self._plan is None or self._plan.metadata is not metadata:
            self._plan = _DecodePlan.build(metadata, block_size, device)
        return self._plan

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if self._attends_in_float32(query, kv_cache):  # the float32 call below takes the kernels' path
            output = self.forward(query.float(), key.float(), value.float(), kv_cache, metadata, scale)
            return output.to(query.dtype)
        plan = self._decode_plan(metadata, kv_cache.shape[2], query.device)
        if plan.rows and plan.token_index is None:  # a decode-only step
            library = self._kernel(query, kv_cache)
            writes = _kv_write_kernel(key, value, kv_cache, metadata.slot_mapping) is not None
            if library is not None and writes:
                new_kv = (key, value, metadata.slot_mapping)  # written by the kernel as it attends
                return paged_decode_attention(
                    library, query, kv_cache, plan.tables, plan.lengths, scale, new_kv
                )
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        if plan.rows and plan.token_index is None:
            return self._decode(query, kv_cache, plan, scale)
        output = torch.empty_like(query)
        if plan.rows:
            output[plan.token_index] = self._decode(query, kv_cache, plan, scale)
        decoding = set(plan.rows)
        for i in range(metadata.num_seqs):
            if i not in decoding:
                self._prefill(query, key, value, kv_cache, metadata, i, output, scale)
        return output

    def _attends_in_float32(self, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """A half-precision model (bfloat16) over a cache the C kernels read: its queries, keys and values
        go to them in float32. The torch path pads a step's decode rows to one length, which made a row's
        result depend on the others in half precision; the kernels compute each sequence alone."""
        return (
            self.use_kernel
            and query.device.type == "cpu"
            and query.dtype in (torch.bfloat16, torch.float16)
            and kv_cache.dtype in KERNEL_CACHE_DTYPES
            and query.shape[2] % 8 == 0
            and kernel_library() is not None
        )

    def _prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        i: int,
        output: torch.Tensor,
        scale: float,
    ) -> None:
        start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
        context_len = metadata.context_lens[i]
        q = query[start:end]  # [query_len, num_heads, head_dim]
        library = self._kernel(q, kv_cache)
        if library is not None and output.is_contiguous():  # over the blocks where they lie (kernels/)
            table = metadata.block_tables[i]
            kernels.prefill_attention_paged(
                library, q, kv_cache, table, context_len + end - start, scale, output[start:end]
            )
            return
        if context_len == 0:
            k, v = key[start:end], value[start:end]
            if kv_cache.dtype != k.dtype:  # as a later chunk or a prefix hit will read them: rounded
                k, v = (x.to(kv_cache.dtype).to(q.dtype) for x in (k, v))
        else:
            k, v = (
                x.to(q.dtype)
                for x in gather_kv(kv_cache, metadata.block_tables[i], context_len + end - start)
            )
        mask = None
        if context_len > 0:
            key_pos = torch.arange(k.shape[0], device=q.device)
            query_pos = torch.arange(context_len, context_len + end - start, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [query_len, seq_len]
        # With a batch dimension torch takes its fused CPU kernel (flash attention: no score matrix, masked
        # blocks skipped); 3-D inputs take the reference path, about 3x slower at prompt lengths of hundreds.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        output[start:end] = out[0].transpose(0, 1)

    def _decode(
        self, query: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan, scale: float
    ) -> torch.Tensor:  # [len(plan.rows), num_heads, head_dim]
        q = query if plan.token_index is None else query[plan.token_index]
        library = self._kernel(q, kv_cache)
        if library is not None:  # reads the blocks in place: no gather, no padding (kernels/)
            return paged_decode_attention(library, q, kv_cache, plan.tables, plan.lengths, scale)
        batch, (num_heads, head_dim), num_kv_heads = len(plan.rows), query.shape[1:], kv_cache.shape[3]
        # index_select over whole blocks is several times faster than advanced indexing here.
        k, v = (
            kv_cache[i]
            .index_select(0, plan.flat_table)
            .view(batch, -1, num_kv_heads, head_dim)[:, : plan.max_len]
            .transpose(1, 2)
            .to(q.dtype)
            for i in (0, 1)
        )  # [batch, kv_heads, max_len, head_dim]
        # Grouped queries: the heads sharing a KV head become query rows, so K/V are never repeated.
        q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scale)
        return out.reshape(batch, num_heads, head_dim)

    def _kernel(self, query: torch.Tensor, kv_cache: torch.Tensor) -> ctypes.CDLL | None:
        """The C decode and prefill kernels where they apply: a cache they read, and see `_float32_kernel`."""
        return self._float32_kernel(query) if kv_cache.dtype in KERNEL_CACHE_DTYPES else None

    def _float32_kernel(self, *tensors: torch.Tensor) -> ctypes.CDLL | None:
        """The C kernels' library where they apply to `tensors` ([tokens, heads, head_dim] each): float32 on
        the CPU, head_dim a multiple of 8, heads contiguous."""
        applies = self.use_kernel and all(
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.shape[2] % 8 == 0
            and kernels.heads_contiguous(x)
            for x in tensors
        )
        return kernel_library() if applies else None
