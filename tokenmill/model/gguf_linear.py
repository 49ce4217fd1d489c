"""`--quantization gguf`: linear layers that keep a GGUF file's own quantized weights (Q4_0, Q4_1, Q8_0).

A Q4_1 GGUF served as float32 reads 4 bytes per weight at every decode step and int8 reads 1 (after
rounding the file's weights again, per channel); the file itself needs 0.625. This transform takes the
model as loaded (its float weights are the file's, dequantized) and gives every linear layer whose
checkpoint tensors are all of one supported block type a `GGUFLinear` holding those tensors' bytes,
rearranged for the C kernel (kernels/block_linear.c) but not rounded again; the LM head takes the output
tensor, or the token embedding when tied (the embedding table keeps its float copy for lookups).

The kernel rounds each token's activations to int8 blocks of 32, as the int8 path and llama.cpp do. It runs
on x86-64 CPUs with AVX2; elsewhere `quantize_gguf` leaves the model as loaded, with a warning.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from tokenmill.kernels.cpu import kernel_library
from tokenmill.kernels.memory import pack_on_huge_pages
from tokenmill.loader.gguf_loader import GGUFTensor, iter_gguf_tensors
from tokenmill.model.layers.embedding import LMHead
from tokenmill.model.layers.linear import LinearBase
from tokenmill.model.llama import stacked_target
from tokenmill.model.quantization import GGUFLinear, replace_module, use_cpu_layer_ops

logger = logging.getLogger(__name__)

# GGUF block type -> the kernel's layout it is stored in (Q4_0 is Q4_1 with minimum -8 d).
KERNEL_FORMATS = {
    GGMLQuantizationType.Q4_0: "Q4_1",
    GGMLQuantizationType.Q4_1: "Q4_1",
    GGMLQuantizationType.Q8_0: "Q8_0",
}
COLUMNS = 8  # weight rows the kernel interleaves: one per float lane
SHARD_ORDER = {"q": 0, "k": 1, "v": 2}


def pack_rows(data: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """GGUF rows `data` [N, bytes per row] of a supported block type -> the kernel's groups of 8 rows
    [ceil(N / 8), bytes per group] (layout in kernels/block_linear.c). Only bytes move: every weight keeps
    its value."""
    num_rows = data.shape[0]
    _, block_bytes = GGML_QUANT_SIZES[tensor_type]
    blocks = np.ascontiguousarray(data).reshape(num_rows, -1, block_bytes)
    padding = -num_rows % COLUMNS  # zero rows: their outputs are never written
    blocks = np.concatenate([blocks, np.zeros((padding, *blocks.shape[1:]), dtype=np.uint8)])
    scales = _interleaved(blocks[:, :, 0:2])
    if tensor_type == GGMLQuantizationType.Q8_0:
        return np.concatenate([_interleaved(blocks[:, :, 2:]), scales], axis=2).reshape(len(scales), -1)
    if tensor_type == GGMLQuantizationType.Q4_1:
        mins, packed = blocks[:, :, 2:4], blocks[:, :, 4:]
    else:  # Q4_0: w = d (q - 8) = d q + m with m = -8 d (exact in float16: a power of two)
        mins = (blocks[:, :, 0:2].copy().view(np.float16) * np.float16(-8)).view(np.uint8)
        packed = blocks[:, :, 2:]
    # GGUF byte j holds value j (low half) and j + 16 (high half); the kernel's load i holds values 4i ..
    # 4i + 3 of each row in its low halves and 4i + 16 .. 4i + 19 in its high halves: the same pairing.
    return np.concatenate([_interleaved(packed), scales, _interleaved(mins)], axis=2).reshape(len(scales), -1)


def _interleaved(parts: np.ndarray) -> np.ndarray:
    """[N, blocks, bytes] -> [N / 8, blocks, bytes * 8]: for each group of 8 rows and each block, the rows'
    bytes 4 at a time (bytes 0-3 of rows 0..7, then bytes 4-7 of rows 0..7, ...; 2-byte parts row after
    row)."""
    num_rows, num_blocks, width = parts.shape
    step = min(width, 4)
    grouped = parts.reshape(num_rows // COLUMNS, COLUMNS, num_blocks, width // step, step)
    return grouped.transpose(0, 2, 3, 1, 4).reshape(num_rows // COLUMNS, num_blocks, width * COLUMNS)


@dataclass(frozen=True)
class GGUFPlan:
    """Which linear layers of a model take a GGUF file's blocks, decided before the weights are loaded so
    that the loader can skip dequantizing what those layers replace."""

    layers: dict[str, list[GGUFTensor]]  # module name -> its tensors, stacked in this order
    checkpoint_names: frozenset[str]  # the HF names of those tensors

    @property
    def unloaded_tensors(self) -> frozenset[str]:
        """Checkpoint tensors the float model need not load (the embedding table is still looked up)."""
        return self.checkpoint_names - {"model.embed_tokens.weight"}

    @property
    def replaced_parameters(self) -> frozenset[str]:
        return frozenset(f"{name}.weight" for name in self.layers)


def plan_gguf_layers(model: nn.Module, gguf_file: Path, device: torch.device) -> GGUFPlan | None:
    """The layers of `model` (on `device`, its parameters maybe not loaded yet) whose checkpoint tensors in
    `gguf_file` share one block type the kernel reads, or None (with a warning) where the kernels do not
    run: the model then keeps float weights."""
    if device.type != "cpu" or kernel_library() is None:
        logger.warning(
            "--quantization gguf runs the file's blocks in CPU kernels (x86-64 with AVX2); on %s the model "
            "keeps the dequantized weights it was loaded with",
            device.type if device.type != "cpu" else "this machine",
        )
        return None
    layers: dict[str, list[GGUFTensor]] = {}
    names: set[str] = set()
    skipped: dict[str, int] = defaultdict(int)  # block types the kernel does not read -> layers
    for module_name, shards in _module_shards(model, dict(iter_gguf_tensors(gguf_file))).items():
        types = {tensor.tensor_type for _, tensor in shards}
        if len(types) != 1 or next(iter(types)) not in KERNEL_FORMATS:
            skipped[" + ".join(sorted(t.name for t in types))] += 1
            continue
        layers[module_name] = [tensor for _, tensor in shards]
        names.update(name for name, _ in shards)
    if skipped:
        kinds = ", ".join(f"{count} of {kind}" for kind, count in sorted(skipped.items()))
        logger.info("float weights kept for linear layers of block types the kernel does not read: %s", kinds)
    return GGUFPlan(layers, frozenset(names))


@torch.no_grad()
def apply_gguf_plan(model: nn.Module, plan: GGUFPlan) -> int:
    """Replaces (in place) each planned layer of `model` by a `GGUFLinear` over its tensors (biases come
    from the loaded layer); returns how many it replaced."""
    layers: list[GGUFLinear] = []
    for module_name, tensors in plan.layers.items():
        layer = _gguf_layer(model.get_submodule(module_name), tensors)
        replace_module(model, module_name, layer)
        layers.append(layer)
    for layer, weight in zip(layers, pack_on_huge_pages([layer.weight for layer in layers]), strict=True):
        layer.weight = weight
    use_cpu_layer_ops(model)
    return len(layers)


def quantize_gguf(model: nn.Module, gguf_file: Path) -> int:
    """Plans and applies GGUF layers on a model loaded from `gguf_file`; returns how many it replaced."""
    plan = plan_gguf_layers(model, gguf_file, next(model.parameters()).device)
    return 0 if plan is None else apply_gguf_plan(model, plan)


def _gguf_layer(module: nn.Module, tensors: list[GGUFTensor]) -> GGUFLinear:
    """The layer over `tensors` (one block type, stacked in this order) that replaces `module`."""
    tensor_type = tensors[0].tensor_type
    packed = pack_rows(np.concatenate([tensor.data for tensor in tensors]), tensor_type)
    output_size, input_size = cast(torch.Tensor, module.weight).shape
    bias = cast(torch.Tensor | None, getattr(module, "bias", None))
    return GGUFLinear(torch.from_numpy(packed), KERNEL_FORMATS[tensor_type], output_size, input_size, bias)


def _module_shards(
    model: nn.Module, tensors: dict[str, GGUFTensor]
) -> dict[str, list[tuple[str, GGUFTensor]]]:
    """Each linear module of `model` -> its GGUF tensors with their HF names, in the order its weight
    stacks them (q, k, v; gate, up). `tensors` maps HF weight names to the file's tensors."""
    names = dict(tensors)
    embedding = names.pop("model.embed_tokens.weight", None)
    grouped: dict[str, list[tuple[int, str, GGUFTensor]]] = defaultdict(list)
    for hf_name, tensor in names.items():
        if not hf_name.endswith(".weight"):
            continue
        target, shard = stacked_target(hf_name)
        order = SHARD_ORDER[shard] if isinstance(shard, str) else (shard or 0)
        grouped[target.removesuffix(".weight")].append((order, hf_name, tensor))
    if "lm_head" not in grouped and embedding is not None:  # tied: the head takes the embedding's blocks
        grouped["lm_head"].append((0, "model.embed_tokens.weight", embedding))
    modules = dict(model.named_modules())
    return {
        name: [(hf_name, tensor) for _, hf_name, tensor in sorted(parts, key=lambda part: part[0])]
        for name, parts in grouped.items()
        if isinstance(modules.get(name), LinearBase | LMHead)
    }
