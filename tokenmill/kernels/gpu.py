"""Which GPU kernels a layer's tensors take: the Triton layer ops (triton_layer_ops.py) for CUDA tensors
in half precision. TOKENMILL_TRITON_LAYER_OPS=0 turns them off; =1 gives them every tensor, float32 too,
and CPU tensors when triton's interpreter runs (TRITON_INTERPRET=1: tests). Triton is imported only when
a tensor could use them, so this module imports cleanly without triton or CUDA."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from tokenmill.attention.triton_interpret import INTERPRET_ENV

logger = logging.getLogger(__name__)

LAYER_OPS_ENV = "TOKENMILL_TRITON_LAYER_OPS"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def triton_layer_ops(x: torch.Tensor) -> ModuleType | None:
    """The Triton layer-ops module when `x` should use it, else None (the caller's torch path)."""
    mode = _mode()
    if mode == "0":
        return None
    on_cuda = x.device.type == "cuda"
    if mode == "1":
        takes = on_cuda or (x.device.type == "cpu" and os.environ.get(INTERPRET_ENV) == "1")
    else:
        takes = on_cuda and x.dtype in HALF_DTYPES
    return _layer_ops_module() if takes else None


@functools.cache
def _mode() -> str:
    return os.environ.get(LAYER_OPS_ENV, "auto").strip() or "auto"


@functools.cache
def _layer_ops_module() -> ModuleType | None:
    try:
        from tokenmill.kernels import triton_layer_ops
    except ImportError as error:
        logger.warning("Triton layer ops unavailable (%s): the layers take torch's ops", error)
        return None
    return triton_layer_ops
