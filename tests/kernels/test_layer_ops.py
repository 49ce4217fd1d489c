"""The C layer ops (kernels/layer_ops.c) against the torch expressions they replace, and their wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary, rotate_half

requires_kernel = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"CPU kernels: {cpu.unavailable_reason()}"
)


def library() -> object:
    ops = cpu.kernel_library()
    assert ops is not None
    return ops


def rope_tables(num_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rope = RotaryEmbedding(head_dim, 4096, {"rope_theta": 10000.0, "rope_type": "default"})
    return rope.cos_sin(torch.randint(0, 4096, (num_tokens,)), torch.float32)


@requires_kernel
@pytest.mark.parametrize("num_tokens", [1, 7, 40])  # 40: rows split over the threads
@pytest.mark.parametrize("head_dim", [64, 128, 12])  # 12: halves of 6 take the scalar loop
def test_rotary_is_bit_for_bit_the_torch_expression(num_tokens: int, head_dim: int) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(num_tokens, 14 * head_dim)
    qk = qkv[:, : 12 * head_dim].view(num_tokens, 12, head_dim)  # strided rows, as the model passes them
    cos, sin = rope_tables(num_tokens, head_dim)
    ours = cpu.rotary(library(), qk, cos, sin)
    assert torch.equal(ours, qk * cos + rotate_half(qk) * sin)
    assert torch.equal(apply_rotary(qk, (cos, sin)), ours)  # the layer takes the kernel


@requires_kernel
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(num_tokens: int, with_residual: bool) -> None:
    torch.manual_seed(0)
    x, residual, weight = torch.randn(num_tokens, 576) * 3, torch.randn(num_tokens, 576), torch.randn(576)
    out, summed = cpu.rms_norm(library(), x, residual if with_residual else None, weight, 1e-5)
    expected_input = x + residual if with_residual else x
    if with_residual:
        assert summed is not None and torch.equal(summed, expected_input)
    else:
        assert summed is None
    torch.testing.assert_close(out, F.rms_norm(expected_input, (576,), weight, 1e-5), rtol=2e-6, atol=2e-6)


@requires_kernel
@pytest.mark.parametrize("num_tokens", [1, 3, 33])
@pytest.mark.parametrize("width", [1536, 20])  # 20: two vectors of 8 and a scalar rest of 4
def test_silu_and_mul_matches_torch(num_tokens: int, width: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(num_tokens, 2 * width) * 6
    x[0, :4] = torch.tensor([-200.0, -88.5, 90.0, 0.0])  # beyond exp's float range both ways, and zero
    ours = cpu.silu_and_mul(library(), x)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ours, F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@requires_kernel
def test_int8_models_switch_norm_and_activation_to_the_kernels() -> None:
    from tokenmill.model.quantization import quantize_int8

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"norm": RMSNorm(64), "act": SiluAndMul(), "lm_head": torch.nn.Linear(64, 8)})
    model["norm"].weight.data.normal_()
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    float_out = model["norm"](x, residual)
    quantize_int8(model)
    assert model["norm"].use_cpu_kernel and model["act"].use_cpu_kernel
    kernel_out = model["norm"](x, residual)
    assert isinstance(kernel_out, tuple) and isinstance(float_out, tuple)
    assert torch.equal(kernel_out[1], float_out[1])
    torch.testing.assert_close(kernel_out[0], float_out[0], rtol=2e-6, atol=2e-6)
    assert not RMSNorm(64).use_cpu_kernel  # float models keep torch's ops (bit for bit transformers')


def test_layers_fall_back_to_torch_off_the_kernel_path() -> None:
    """bfloat16 and strided heads take the torch expressions (the kernels are float32, heads contiguous)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, dtype=torch.bfloat16)
    cos, sin = (t.to(torch.bfloat16) for t in rope_tables(4, 16))
    assert torch.equal(apply_rotary(x, (cos, sin)), x * cos + rotate_half(x) * sin)
    heads_strided = torch.randn(4, 16, 3).transpose(1, 2)
    cos, sin = rope_tables(4, 16)
    expected = heads_strided * cos + rotate_half(heads_strided) * sin
    assert torch.equal(apply_rotary(heads_strided, (cos, sin)), expected)
