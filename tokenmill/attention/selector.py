"""Chooses the attention backend for a device: the fused GPU kernels where they exist, else torch SDPA."""

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.cpu import TorchSDPABackend


def get_attention_backend(device: torch.device, dtype: torch.dtype | None = None) -> AttentionBackend:
    # The Triton backend for CUDA plugs in here (GPU issue); SDPA is correct everywhere.
    return TorchSDPABackend()
