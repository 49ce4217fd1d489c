import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu import kernel_library, rms_norm
from tokenmill.kernels.gpu import triton_layer_ops


class RMSNorm(nn.Module):
    """RMSNorm in float32 as the reference implementation does it, optionally fused with the residual add.

    With `use_cpu_kernel` (set by the int8 transform, whose model is approximate anyway) float32 CPU calls
    take one C kernel call (kernels/layer_ops.c): several times faster at decode, within a rounding of
    torch's result rather than bit for bit, so the float model keeps torch's ops and matches transformers.
    Half-precision CUDA tensors take one Triton kernel (kernels/triton_layer_ops.py), rounded as below.
    """

    use_cpu_kernel = False

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one call instead of six, bit for bit the same as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        gpu_ops = triton_layer_ops(x)
        if gpu_ops is not None and self.weight.dtype == x.dtype:  # one launch instead of eight or nine
            out, summed = gpu_ops.rms_norm(x, residual, self.weight, self.eps)
            return out if summed is None else (out, summed)
        library = self._kernel(x)
        if library is not None:
            out, summed = rms_norm(library, x, residual, self.weight, self.eps)
            return out if summed is None else (out, summed)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _kernel(self, x: torch.Tensor) -> ctypes.CDLL | None:
        applies = self.use_cpu_kernel and x.dtype == torch.float32 and x.device.type == "cpu"
        return kernel_library() if applies and x.shape[-1] % 8 == 0 else None
