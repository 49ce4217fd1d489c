"""Attention over the paged KV cache with PyTorch's scaled_dot_product_attention (CPU; any device works).

Decode rows (one query token) are gathered and computed as one padded batch; prefill rows (several query
tokens, possibly after cached context) one sequence at a time with a causal mask offset by the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached keys and values: [seq_len, num_kv_heads, head_dim] each."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = (seq_len + block_size - 1) // block_size
    table = block_table[:num_blocks]
    key = kv_cache[0].index_select(0, table).view(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1].index_select(0, table).view(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


class TorchSDPABackend:
    supports_cuda_graphs = False  # reads per-sequence lengths from the host lists

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        output = torch.empty_like(query)
        decode_rows = [i for i, q in enumerate(metadata.query_lens) if q == 1]
        if decode_rows:
            self._decode(query, kv_cache, metadata, decode_rows, output, scale)
        for i, query_len in enumerate(metadata.query_lens):
            if query_len > 1:
                self._prefill(query, key, value, kv_cache, metadata, i, output, scale)
        return output

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
        q = query[start:end].transpose(0, 1)  # [num_heads, query_len, head_dim]
        if context_len == 0:
            k, v = key[start:end], value[start:end]
            mask = None
        else:
            k, v = gather_kv(kv_cache, metadata.block_tables[i], context_len + end - start)
            key_pos = torch.arange(k.shape[0], device=q.device)
            query_pos = torch.arange(context_len, context_len + end - start, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [query_len, seq_len]
        out = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        output[start:end] = out.transpose(0, 1)

    def _decode(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        rows: list[int],
        output: torch.Tensor,
        scale: float,
    ) -> None:
        token_idx = [metadata.query_start_loc[i] for i in rows]
        batch, (num_heads, head_dim), num_kv_heads = len(rows), query.shape[1:], kv_cache.shape[3]
        max_len = max(metadata.context_lens[i] + 1 for i in rows)
        block_size = kv_cache.shape[2]
        num_blocks = (max_len + block_size - 1) // block_size
        # index_select over whole blocks is several times faster than advanced indexing here.
        flat_table = metadata.block_tables[rows, :num_blocks].flatten()
        k, v = (
            kv_cache[i]
            .index_select(0, flat_table)
            .view(batch, -1, num_kv_heads, head_dim)[:, :max_len]
            .transpose(1, 2)
            for i in (0, 1)
        )  # [batch, kv_heads, max_len, head_dim]
        mask = torch.arange(max_len, device=query.device)[None, :] < metadata.seq_lens[rows][:, None]
        # Grouped queries: the heads sharing a KV head become query rows, so K/V are never repeated.
        q = query[token_idx].view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
        output[token_idx] = out.reshape(batch, num_heads, head_dim)
