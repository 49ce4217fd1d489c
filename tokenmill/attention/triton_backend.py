"""The Triton attention backend: our own kernels for the KV-cache write, decode and (chunked) prefill.

Decode-only steps (every sequence brings one token) go to the flash-decoding kernel, split along the
sequence for long contexts; any other step goes to the prefill kernel in one launch, decode rows included.
What a step's launches need from the host (tile list, number of splits) is computed once per metadata
object and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.cpu import TorchSDPABackend
from tokenmill.attention.triton_decode import choose_num_splits, paged_decode_attention
from tokenmill.attention.triton_kv_write import write_kv_cache
from tokenmill.attention.triton_prefill import PrefillTiles, build_prefill_tiles, paged_prefill_attention

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _StepPlan:
    """How one step's attention is launched; shared by all layers of that step."""

    metadata: AttentionMetadata
    group_size: int
    is_decode_only: bool
    num_splits: int
    tiles: PrefillTiles | None


class TritonBackend:
    """Paged attention with Triton kernels (CUDA; or on CPU under TRITON_INTERPRET=1 for tests).

    The kernels serve fp16 and bf16; float32 steps go to the SDPA backend unless `fp32_kernels` is set
    (then the kernels run with full-precision float32 dots, without tensor cores). SDPA cannot be captured
    in a CUDA graph, so the selector gives float32 models this backend only with `fp32_kernels`.

    CUDA graphs: a decode step reads per-sequence lengths from `metadata.seq_lens` on the device and uses
    the host lists only to size its grid (with upper bounds the result is the same), allocates only from
    the caching allocator, and copies nothing from the host.
    """

    supports_cuda_graphs = True

    def __init__(self, num_sms: int | None = None, fp32_kernels: bool = False) -> None:
        self.num_sms = num_sms
        self.fp32_kernels = fp32_kernels
        self._sdpa = TorchSDPABackend()
        self._plan: _StepPlan | None = None

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if query.dtype not in KERNEL_DTYPES and not self.fp32_kernels:
            return self._sdpa.forward(query, key, value, kv_cache, metadata, scale)
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        plan = self._plan_for(metadata, query.shape[1] // kv_cache.shape[3], kv_cache.shape[3], query.device)
        query = query if query.stride(-1) == 1 else query.contiguous()
        if plan.is_decode_only:
            return paged_decode_attention(
                query, kv_cache, metadata.block_tables, metadata.seq_lens, scale, plan.num_splits
            )
        assert plan.tiles is not None
        return paged_prefill_attention(
            query, kv_cache, metadata.block_tables, metadata.seq_lens, plan.tiles, scale
        )

    def _plan_for(
        self, metadata: AttentionMetadata, group_size: int, num_kv_heads: int, device: torch.device
    ) -> _StepPlan:
        plan = self._plan
        if plan is not None and plan.metadata is metadata and plan.group_size == group_size:
            return plan
        is_decode_only = metadata.decode_only or all(q == 1 for q in metadata.query_lens)
        num_splits, tiles = 1, None
        if is_decode_only:
            num_sms = self.num_sms if self.num_sms is not None else _num_sms(device)
            num_splits = choose_num_splits(metadata.num_seqs, num_kv_heads, metadata.max_seq_len, num_sms)
        else:
            tiles = build_prefill_tiles(metadata.query_start_loc, group_size, device)
        self._plan = _StepPlan(metadata, group_size, is_decode_only, num_splits, tiles)
        return self._plan


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any count is correct
