"""Host -> device copies of small per-step tensors (sampler parameters, the prefill tile list)."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`. To CUDA through pinned memory without waiting: a copy from
    pageable memory first waits for the device's queued work, which with async scheduling is the step in
    flight. (torch's pinned-memory cache keeps the buffer until the copy has run.)"""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
