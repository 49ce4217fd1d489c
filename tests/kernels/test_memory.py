"""Anonymous CPU memory for tensors (kernels/memory.py)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.memory import HUGE_PAGE, anonymous_tensor


@pytest.mark.parametrize("huge_pages", [False, True])
@pytest.mark.parametrize("num_bytes", [0, 100, 3 * HUGE_PAGE + 5])
def test_anonymous_memory_is_zeroed_and_writable(num_bytes: int, huge_pages: bool) -> None:
    tensor = anonymous_tensor(num_bytes, huge_pages=huge_pages)
    assert tensor.dtype == torch.uint8 and tensor.numel() == num_bytes
    assert not tensor.any()
    tensor.fill_(7)
    assert int(tensor.sum()) == 7 * num_bytes
    if huge_pages:
        assert tensor.data_ptr() % HUGE_PAGE == 0  # aligned, so every 2 MB of it can be one page
