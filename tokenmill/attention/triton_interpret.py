"""Running the Triton kernels in triton's interpreter on CPU (tests, and TOKENMILL_ATTENTION_BACKEND=triton
without CUDA). Importing this module does not import triton: TRITON_INTERPRET must be set before that.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


def interpret_without_cuda() -> bool:
    """Sets TRITON_INTERPRET=1 when there is no CUDA device (call it before triton is imported: kernels are
    compiled or interpreted as they are decorated); returns whether the kernels will be interpreted."""
    if not torch.cuda.is_available():
        os.environ.setdefault(INTERPRET_ENV, "1")
    interpreted = os.environ.get(INTERPRET_ENV) == "1"
    if interpreted and importlib.util.find_spec("triton") is not None:
        fix_interpreter_scalars()
    return interpreted


def fix_interpreter_scalars() -> None:
    """triton < 3.7's interpreter turns a scalar into a Python int with int(1-element array), which numpy
    >= 2.4 refuses, so any loop bound loaded from memory fails; 3.7 squeezes the array first. Do the same."""
    import triton
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_tokenmill_fixed", False):
        return

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._tokenmill_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
