"""The float linear layers: a row's result does not depend on the rows computed with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.layers.embedding import LMHead
from tokenmill.model.layers.linear import ReplicatedLinear, linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("out_features", "in_features"), [(576, 1536), (1024, 3072), (960, 576)])
def test_a_lone_half_precision_row_gets_what_it_gets_in_a_batch(
    dtype: torch.dtype, out_features: int, in_features: int
) -> None:
    """A sequence decoding alone computes one row per layer; in a batch, many. On a CPU with AVX512-BF16,
    oneDNN's one-row routine rounded 10 of 128 such rows of SmolLM2's down projection (1536 inputs)
    differently from its many-row one."""
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
    x = torch.randn(512, in_features, generator=generator).to(dtype)
    batched = linear(x, weight)
    alone = torch.cat([linear(x[i : i + 1], weight) for i in range(0, 512, 4)])
    assert torch.equal(alone, batched[::4])


def test_the_layers_use_it_and_float32_is_plain_f_linear() -> None:
    generator = torch.Generator().manual_seed(0)
    layer = ReplicatedLinear(64, 32, bias=True)
    head = LMHead(100, 64)
    for module in (layer, head):
        for param in module.parameters():
            param.data = torch.randn(param.shape, generator=generator)
    x = torch.randn(1, 64, generator=generator)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(head(x), F.linear(x, head.weight))
    half = x.bfloat16()
    assert torch.equal(layer.bfloat16()(half), F.linear(half.expand(2, -1), layer.weight, layer.bias)[:1])
    assert torch.equal(head.bfloat16()(half), F.linear(half.expand(2, -1), head.weight)[:1])
