"""Which GPU kernels a layer's tensors take: the Triton layer ops (triton_layer_ops.py) for CUDA tensors
in half precision, unless TOKENMILL_TRITON_LAYER_OPS=0. Triton is imported only when a tensor could use
them, so this module imports cleanly without triton or CUDA."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

LAYER_OPS_ENV = "TOKENMILL_TRITON_LAYER_OPS"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def triton_layer_ops(x: torch.Tensor) -> ModuleType | None:
    """The Triton layer-ops module when `x` should use it, else None (the caller's torch path)."""
    if x.device.type != "cuda" or x.dtype not in HALF_DTYPES:
        return None
    return _layer_ops_module()


@functools.cache
def _layer_ops_module() -> ModuleType | None:
    if os.environ.get(LAYER_OPS_ENV, "1") == "0":
        return None
    try:
        from tokenmill.kernels import triton_layer_ops
    except ImportError as error:
        logger.warning("Triton layer ops unavailable (%s): the layers take torch's ops", error)
        return None
    return triton_layer_ops
