"""The Triton layer ops (residual add + RMSNorm, SiLU-and-mul, rotary) against the torch layers they replace.

Without CUDA the kernels run in triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
float16 must match torch bit for bit (every rounding is reproduced); the interpreter converts to bfloat16
by truncation rather than rounding, so bfloat16 is checked to within one unit in the last place there and
exactly on a GPU. With CUDA, the layers themselves must take the kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.attention.triton_interpret import interpret_without_cuda

INTERPRETED = interpret_without_cuda()  # before triton is imported
pytest.importorskip("triton")

from tokenmill.kernels import gpu, triton_layer_ops  # noqa: E402
from tokenmill.model.layers.activation import SiluAndMul  # noqa: E402
from tokenmill.model.layers.layernorm import RMSNorm  # noqa: E402
from tokenmill.model.layers.rotary import apply_rotary, rotate_half  # noqa: E402

if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        return
    eps = torch.finfo(expected.dtype).eps
    if expected.dtype == torch.bfloat16 and INTERPRETED:  # each of up to three roundings truncated
        torch.testing.assert_close(actual, expected, rtol=4 * eps, atol=4 * eps)
        return
    # Within one unit in the last place: RMSNorm's sum of squares and silu's exponential may round
    # differently.
    ulp = eps * expected.float().abs().clamp_min(1e-3)
    assert ((actual.float() - expected.float()).abs() <= ulp).all()
    if expected.dtype == torch.float16:
        assert (actual != expected).float().mean() < 0.01  # and nearly all of it bit for bit


def random(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def torch_norm(hidden: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-6)
    generator = torch.Generator().manual_seed(1)
    norm.weight.data = (torch.rand(hidden, generator=generator) + 0.5).to(dtype).to(DEVICE)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 576])
def test_rms_norm_with_residual(dtype: torch.dtype, hidden: int) -> None:
    x, residual = random(7, hidden, dtype=dtype, seed=2), random(7, hidden, dtype=dtype, seed=3)
    norm = torch_norm(hidden, dtype)
    expected, expected_sum = norm._norm(x + residual), x + residual  # the torch path, whatever the device
    out, summed = triton_layer_ops.rms_norm(x, residual, norm.weight, norm.eps)
    assert summed is not None
    if dtype == torch.bfloat16 and INTERPRETED:
        assert_matches(summed, expected_sum)
    else:
        assert torch.equal(summed, expected_sum)  # one add, rounded once as torch rounds it
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_heads(dtype: torch.dtype) -> None:
    # Qwen3's per-head q/k norm: [tokens, heads, head_dim] views into the fused qkv output.
    qkv = random(5, 8 * 64, dtype=dtype, seed=4)
    q = qkv[:, : 6 * 64].view(5, 6, 64)
    norm = torch_norm(64, dtype)
    out, summed = triton_layer_ops.rms_norm(q, None, norm.weight, norm.eps)
    assert summed is None
    assert_matches(out, norm._norm(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [80, 1500])  # 1500: two column blocks, the second partial
def test_silu_and_mul(dtype: torch.dtype, width: int) -> None:
    x = random(6, 2 * width, dtype=dtype, seed=5) * 4
    gate, up = x.chunk(2, dim=-1)
    assert_matches(triton_layer_ops.silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_of_strided_rows(dtype: torch.dtype, head_dim: int) -> None:
    num_tokens, num_heads = 4, 5
    x = random(num_tokens, (num_heads + 2) * head_dim, dtype=dtype, seed=6)
    qk = x[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # rows strided, as in a layer
    angles = torch.rand(num_tokens, 1, head_dim // 2, generator=torch.Generator().manual_seed(7)) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype).to(DEVICE)
    expected = qk * cos + rotate_half(qk) * sin
    out = triton_layer_ops.rotary(qk, cos, sin)
    if dtype == torch.bfloat16 and INTERPRETED:
        assert_matches(out, expected)
    else:
        assert torch.equal(out, expected)  # products and sum rounded as torch rounds them


def test_empty_batches() -> None:
    weight = torch.ones(64, dtype=torch.float16, device=DEVICE)
    out, summed = triton_layer_ops.rms_norm(random(0, 64, dtype=torch.float16, seed=0), None, weight, 1e-6)
    assert out.shape == (0, 64) and summed is None
    assert triton_layer_ops.silu_and_mul(random(0, 64, dtype=torch.float16, seed=0)).shape == (0, 32)


def test_only_half_precision_cuda_tensors_take_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu.triton_layer_ops(torch.zeros(2, dtype=torch.float16)) is None  # CPU: the C kernels or torch
    if not torch.cuda.is_available():
        return
    assert gpu.triton_layer_ops(torch.zeros(2, device="cuda")) is None  # float32 keeps torch's ops
    assert gpu.triton_layer_ops(torch.zeros(2, dtype=torch.bfloat16, device="cuda")) is triton_layer_ops
    monkeypatch.setenv(gpu.LAYER_OPS_ENV, "0")
    gpu._mode.cache_clear()
    try:
        assert gpu.triton_layer_ops(torch.zeros(2, dtype=torch.bfloat16, device="cuda")) is None
    finally:
        gpu._mode.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_take_the_kernels_on_cuda(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("rms_norm", "silu_and_mul", "rotary"):
        original = getattr(triton_layer_ops, name)
        spy = lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args)  # noqa: E731
        monkeypatch.setattr(triton_layer_ops, name, spy)
    x, residual = random(3, 128, dtype=dtype, seed=8), random(3, 128, dtype=dtype, seed=9)
    norm = torch_norm(128, dtype)
    out, summed = norm(x, residual)
    assert_matches(out, norm._norm(x + residual))
    gate_up = random(3, 256, dtype=dtype, seed=10)
    assert_matches(SiluAndMul()(gate_up), F.silu(gate_up[:, :128]) * gate_up[:, 128:])
    cos = torch.ones(3, 1, 64, dtype=dtype, device=DEVICE)
    sin = torch.zeros(3, 1, 64, dtype=dtype, device=DEVICE)
    qk = random(3, 2, 64, dtype=dtype, seed=11)
    assert torch.equal(apply_rotary(qk, (cos, sin)), qk)
    assert calls == ["rms_norm", "silu_and_mul", "rotary"]


def test_triton_itself_was_imported_under_the_interpreter() -> None:
    # triton decorates its own library (tl.sum, tl.max) as it is imported; if it was imported before
    # TRITON_INTERPRET was set (transformers imports it through torch._dynamo where torch is a CUDA build),
    # the kernels that reduce fail in triton < 3.7's interpreter.
    if not INTERPRETED:
        pytest.skip("compiled kernels")
    from triton.language import standard

    assert type(standard.sum).__name__ == "InterpretedFunction"
