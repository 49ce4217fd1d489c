import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Paged attention of one layer. The runner binds `kv_cache` and `backend` after allocating the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale
        self.kv_cache = torch.empty(0)  # [2, num_blocks, block_size, num_kv_heads, head_dim] once bound
        self.backend: AttentionBackend | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        assert self.backend is not None, "Attention used before the runner bound a KV cache"
        out = self.backend.forward(q, k, v, self.kv_cache, metadata, self.scale)
        return out.flatten(1, 2)  # [num_tokens, num_heads * head_dim]
