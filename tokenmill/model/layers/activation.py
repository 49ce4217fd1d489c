import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu import kernel_library, silu_and_mul
from tokenmill.kernels.gpu import triton_layer_ops


class SiluAndMul(nn.Module):
    """`silu(gate) * up`. With `use_cpu_kernel` (set by the int8 transform, like RMSNorm's) float32 CPU
    calls take one C kernel call, within a rounding of torch's result."""

    use_cpu_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, 2 * d] laid out [gate | up]
        gpu_ops = triton_layer_ops(x)
        if gpu_ops is not None:  # half precision on CUDA: one launch instead of two
            return gpu_ops.silu_and_mul(x)
        if self.use_cpu_kernel and x.dtype == torch.float32 and x.device.type == "cpu":
            library = kernel_library()
            if library is not None:
                return silu_and_mul(library, x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
