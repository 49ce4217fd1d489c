"""Chooses the attention backend: our Triton kernels on CUDA in fp16/bf16, else torch SDPA.

`TOKENMILL_ATTENTION_BACKEND=sdpa|triton` forces one (`auto`, the default, chooses). Triton is imported
only when it may be chosen, so this module imports cleanly on machines without triton or CUDA.
"""

from __future__ import annotations

import os

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.cpu import TorchSDPABackend
from tokenmill.attention.triton_interpret import INTERPRET_ENV, fix_interpreter_scalars

BACKEND_ENV = "TOKENMILL_ATTENTION_BACKEND"
BACKEND_CHOICES = ("auto", "sdpa", "triton")


def get_attention_backend(device: torch.device, dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend for a model on `device` in `dtype`.

    Pass the dtype: with None, CUDA gets the Triton backend, whose float32 fallback (SDPA) is not safe to
    capture in CUDA graphs.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKEND_CHOICES:
        known = ", ".join(BACKEND_CHOICES)
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not a known backend: use one of {known}")
    if choice == "sdpa":
        return TorchSDPABackend()
    if choice == "triton":
        return _forced_triton_backend(device)
    if device.type != "cuda" or dtype not in (None, torch.float16, torch.bfloat16):
        return TorchSDPABackend()
    try:
        return _triton_backend(fp32_kernels=False)
    except ImportError:
        return TorchSDPABackend()


def _forced_triton_backend(device: torch.device) -> AttentionBackend:
    interpreted = os.environ.get(INTERPRET_ENV) == "1"
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{BACKEND_ENV}=triton needs a CUDA device ({device} given), or TRITON_INTERPRET=1 to run the "
            "kernels in triton's interpreter: set one, or unset the variable"
        )
    try:
        if interpreted:
            fix_interpreter_scalars()
        # Asked for by name, float32 runs through the kernels too (full-precision dots).
        return _triton_backend(fp32_kernels=True)
    except ImportError as error:
        message = f"{BACKEND_ENV}=triton but triton does not import ({error}): pip install triton"
        raise ValueError(message) from error


def _triton_backend(fp32_kernels: bool) -> AttentionBackend:
    from tokenmill.attention.triton_backend import TritonBackend  # imports triton

    return TritonBackend(fp32_kernels=fp32_kernels)
