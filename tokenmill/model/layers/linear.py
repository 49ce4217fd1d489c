"""Linear layers whose parameters load (and will shard) their own checkpoint tensors.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id)`. Fused layers (QKV, gate/up)
take several checkpoint tensors into slices of one parameter. `tp_rank`/`tp_size` select this rank's
slice so tensor parallelism can be added without touching the models; today both are 0/1.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.build import cpu_flags

HALF_DTYPES = (torch.bfloat16, torch.float16)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear`, with each row's result independent of the rows beside it, so that a sequence decodes
    the same tokens alone as in any batch, and after a chunked prefill. On CPU, oneDNN picks its
    half-precision kernel by the row count, and its kernels sum in different orders:

    - A lone row takes a matrix-vector routine whose sums over more than about 1024 inputs round
      otherwise (SmolLM2's down projection: 10 bfloat16 rows of 128 differed): it goes in as two (a few
      percent: SmolLM2's 121 calls of a token, 11.1-13.3 vs 11.3-12.8 ms). Without AMX, rows agreed from
      two rows on with a 512-row call (5 shapes, 128 rows each).
    - With AMX, calls of 2-32 rows agree with each other, and more rows do not (a few rows of every
      shape differ at 33-512 rows): there, a call of more rows runs in blocks of `AMX_ROW_BLOCK`
      (`_in_row_blocks`), which costs prefill ~1.2-1.4x and decoding nothing.

    `packed`: `weight` in oneDNN's own layout (`pack_cpu_half_weights`), which F.linear would otherwise
    make anew on every call; the same results bit for bit."""
    if x.dim() == 2 and x.device.type == "cpu" and x.dtype in HALF_DTYPES:
        if amx_row_blocks() and (
            x.shape[0] > AMX_ROW_BLOCK or not _blocks_agree(weight, bias, packed, x.shape[1])
        ):
            return _in_row_blocks(x, weight, bias, packed)
        if x.shape[0] == 1:
            return _linear(x.expand(2, -1), weight, bias, packed)[:1]
    return _linear(x, weight, bias, packed)


AMX_ROW_BLOCK = 32
"""The most rows of one oneDNN call on an AMX CPU: two 16-row tiles, the rows its kernels for 2-32 rows
compute alike."""


@cache
def amx_row_blocks() -> bool:
    """Whether half-precision CPU linears of many rows run in row blocks: on CPUs with AMX tiles."""
    return bool(cpu_flags() & {"amx_bf16", "amx_fp16"})


def _in_row_blocks(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """`x`'s rows in blocks of AMX_ROW_BLOCK, the last one with the rest (a lone row padded to two). For
    a shape whose calls of 2-32 rows this CPU does not compute alike (`_blocks_agree`), every call is
    padded to whole blocks: one kernel for every row, at the padding's cost."""
    rows = x.shape[0]
    pad_to = AMX_ROW_BLOCK if not _blocks_agree(weight, bias, packed, x.shape[1]) else 2
    padding = max(0, pad_to - (rows - 1) % AMX_ROW_BLOCK - 1)
    if padding:
        x = torch.cat([x, x.new_zeros(padding, x.shape[1])])
    blocks = [_linear(block, weight, bias, packed) for block in x.split(AMX_ROW_BLOCK)]
    return torch.cat(blocks)[:rows]


_AGREEING_SHAPES: dict[tuple[object, ...], bool] = {}


def _blocks_agree(
    weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None, in_features: int
) -> bool:
    """Whether calls of 2-32 rows give each row the same result here, checked once per shape on random
    rows with the layer's own operands (oneDNN picks kernels by shape, dtype and thread count)."""
    operand = packed if packed is not None else weight
    key = (tuple(operand.shape), operand.dtype, packed is not None, bias is not None, torch.get_num_threads())
    if key not in _AGREEING_SHAPES:
        x = torch.randn(AMX_ROW_BLOCK, in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(operand.dtype)
        full = _linear(x, weight, bias, packed)
        _AGREEING_SHAPES[key] = all(
            torch.equal(_linear(x[:rows], weight, bias, packed), full[:rows])
            for rows in (2, 3, 7, 16, 17, 31)
        )
    return _AGREEING_SHAPES[key]


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    if packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def can_pack_cpu_weights() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_cpu_half_weights(model: nn.Module) -> int:
    """Reorders the half-precision (bfloat16, float16) weights of the model's CPU linear layers into
    oneDNN's layout once. F.linear reorders them on every call, which took about half of a decode step's
    matrix time (the LM head of SmolLM2 at 2 rows: 3.3 -> 2.0 ms). A weight no other module holds (a tied
    LM head's is the embedding's) keeps only its packed copy. A dtype oneDNN cannot pack on this CPU (float16
    without AVX512-FP16 or AVX-NE-CONVERT) stays as it is. Returns how many layers were packed."""
    if not can_pack_cpu_weights():
        return 0
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "packed_weight") or not isinstance(weight, torch.Tensor):
            continue
        if weight.device.type != "cpu" or weight.dtype not in HALF_DTYPES or weight.dim() != 2:
            continue
        try:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2)
        except RuntimeError:  # "fp16 path needs the cpu support avx_ne_convert or avx512_fp16"
            continue
        if holders.get(id(weight), 0) == 1:
            weight.data = weight.data.new_empty(0)  # the packed copy is the weight now
        packed += 1
    return packed


def _parameter(*shape: int) -> nn.Parameter:
    # Uninitialized: every element is overwritten by the checkpoint.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_dim = 0, 1, tp_dim
        self.input_size, self.output_size = input_size, output_size
        self.weight = _parameter(output_size, input_size)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.packed_weight: torch.Tensor | None = None  # see pack_cpu_half_weights
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = _parameter(output_size)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        param.data.copy_(self._rank_slice(loaded, param))

    def _rank_slice(self, loaded: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        if self.tp_dim is None or self.tp_size == 1 or (param.dim() == 1 and self.tp_dim == 1):
            return loaded
        size = loaded.size(self.tp_dim) // self.tp_size
        return loaded.narrow(self.tp_dim, self.tp_rank * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=0)


class RowParallelLinear(LinearBase):
    """Input features split across ranks (the partial sums are all-reduced under tensor parallelism)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=1)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        assert isinstance(shard_id, int), "merged linear shards are numbered"
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, size).copy_(self._rank_slice(loaded, param))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one matmul; output layout [q | k | v]."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def shard_offsets(self) -> dict[str, tuple[int, int]]:
        q = self.num_heads * self.head_dim // self.tp_size
        kv = self.num_kv_heads * self.head_dim // self.tp_size
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        assert isinstance(shard_id, str), "qkv shards are named q, k, v"
        offset, size = self.shard_offsets()[shard_id]
        param.data.narrow(0, offset, size).copy_(self._rank_slice(loaded, param))
