"""The float linear layers: a row's result does not depend on the rows computed with it, and packed
half-precision weights change no number."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import LLM, SamplingParams
from tokenmill.engine import core
from tokenmill.model.layers import linear as linear_module
from tokenmill.model.layers.embedding import LMHead, VocabEmbedding
from tokenmill.model.layers.linear import (
    ReplicatedLinear,
    can_pack_cpu_weights,
    linear,
    pack_cpu_half_weights,
)


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


ROW_COUNTS = (1, 2, 3, 16, 31, 32, 33, 47, 64, 65, 100, 200)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_no_row_count_changes_a_rows_result(
    packed: bool, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding alone, in a batch, and a prefill in chunks of any size call the same layer with other row
    counts. On an AMX CPU oneDNN's kernels for 33-512 rows summed a few rows otherwise than those for
    2-32 (SmolLM2's shapes): rows go in blocks of 32, and a shape whose 2-32 rows disagreed would be
    padded to whole blocks (`padded` stands that in, on any CPU)."""
    if packed and not can_pack_cpu_weights():
        pytest.skip("this torch has no oneDNN")
    if padded:
        monkeypatch.setattr(linear_module, "amx_row_blocks", lambda: True)
        monkeypatch.setattr(linear_module, "_blocks_agree", lambda *args: False)
    generator = torch.Generator().manual_seed(4)
    for out_features, in_features in ((960, 576), (576, 1536), (4096, 576)):
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).bfloat16()
        packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 2) if packed else None
        x = torch.randn(512, in_features, generator=generator).bfloat16()
        every_row = linear(x, weight, packed=packed_weight)
        for rows in ROW_COUNTS:
            start = rows % 7  # the rows at other places in the call, beside other rows
            some = linear(x[start : start + rows], weight, packed=packed_weight)
            assert torch.equal(some, every_row[start : start + rows]), (out_features, in_features, rows)


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


needs_onednn = pytest.mark.skipif(not can_pack_cpu_weights(), reason="this torch has no oneDNN")


class TinyModel(nn.Module):
    """An embedding with the LM head tied to it, a projection with a bias and one in float32."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.embed = VocabEmbedding(300, 96)
        self.head = LMHead(300, 96, tied_to=self.embed)
        self.proj = ReplicatedLinear(96, 1100, bias=True)
        self.exact = ReplicatedLinear(96, 40)
        for param in self.parameters():
            param.data = torch.randn(param.shape, generator=generator).mul(0.1).to(dtype)
        self.exact.float()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_weights_give_f_linears_numbers_bit_for_bit(dtype: torch.dtype) -> None:
    model = TinyModel(dtype)
    rows = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)).to(dtype)
    inputs = [rows[:1], rows[:2], rows[:3], rows[:17], rows, rows.view(4, 16, 96), rows[:, :48].repeat(1, 2)]
    expected = [(model.head(x), model.proj(x)) for x in inputs]
    plain_proj, plain_head = model.proj.weight.data.clone(), model.head.weight

    packed = pack_cpu_half_weights(model)  # float16: only where the CPU has AVX512-FP16 or AVX-NE-CONVERT
    assert packed == 2 or (dtype == torch.float16 and packed == 0)  # the head and the projection
    assert model.exact.packed_weight is None and model.exact.weight.numel() == 96 * 40  # float32: as it was
    if packed:
        assert model.proj.packed_weight is not None and model.head.packed_weight is not None
        assert model.proj.weight.numel() == 0  # held once, packed: the plain copy is gone
    assert model.head.weight is model.embed.weight and model.embed.weight.numel() == 300 * 96  # tied: kept
    for x, (head, proj) in zip(inputs, expected, strict=True):
        assert torch.equal(model.head(x), head) and torch.equal(model.proj(x), proj)
    assert torch.equal(model.embed(torch.tensor([5, 7])), plain_head[[5, 7]])
    assert torch.equal(F.linear(rows, plain_proj, model.proj.bias), model.proj(rows))


@needs_onednn
def test_a_bfloat16_model_on_cpu_decodes_the_same_with_its_weights_packed(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14, 16, 18]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)

    def run() -> tuple[LLM, list[Any]]:
        llm = LLM(str(tiny_model_dir("llama")), dtype="bfloat16", max_model_len=128, kv_cache_memory=4 << 20)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return llm, [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]

    packed_llm, packed = run()
    down_proj = packed_llm.engine.core.runner.model.model.layers[0].mlp.down_proj
    assert down_proj.packed_weight is not None and down_proj.weight.numel() == 0
    monkeypatch.setattr(core, "pack_cpu_half_weights", lambda model: 0)
    plain_llm, plain = run()
    assert plain_llm.engine.core.runner.model.model.layers[0].mlp.down_proj.packed_weight is None
    assert packed == plain  # token ids and logprobs, exact floats
