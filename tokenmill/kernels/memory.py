"""Anonymous memory for tensors on CPU: zero pages supplied by the OS as they are first touched, and 2 MB
pages where asked for and the OS allows them."""

from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 2 << 20


def anonymous_tensor(num_bytes: int, huge_pages: bool = False) -> torch.Tensor:
    """`num_bytes` of zeroed memory as a uint8 tensor; nothing is written (or resident) until used.

    With `huge_pages` the mapping is aligned to 2 MB and advised to use transparent huge pages (Linux, in
    its `madvise` or `always` mode): a kernel streaming 100 MB of weights otherwise takes a TLB miss every
    4 KB, which under virtualisation costs it a sixth of its bandwidth or more (benchmarks/RESULTS.md)."""
    if not huge_pages or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.frombuffer(_private_mapping(max(num_bytes, 1)), dtype=torch.uint8)[:num_bytes]
    buffer = _private_mapping(num_bytes + HUGE_PAGE)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buffer)) % HUGE_PAGE
    return torch.frombuffer(buffer, dtype=torch.uint8)[start : start + num_bytes]


def _private_mapping(num_bytes: int) -> mmap.mmap:
    # Private, not mmap's default shared mapping: shared anonymous memory is shmem to the kernel, which
    # counts it apart and never backs it with transparent huge pages.
    return mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def pack_on_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU `tensors` in one buffer on huge pages, each on its own cache lines: decode streams every
    weight byte once per step, and 4 KB pages cost it a TLB miss each."""
    sizes = [-(-tensor.nbytes // 64) * 64 for tensor in tensors]
    storage = anonymous_tensor(sum(sizes), huge_pages=True)
    copies, offset = [], 0
    for tensor, size in zip(tensors, sizes, strict=True):
        copy = storage[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        copies.append(copy)
        offset += size
    return copies
