from pathlib import Path

import pytest
import torch

from tokenmill.kernels import build
from tokenmill.loader import dtype as dtype_module
from tokenmill.loader import resolve_dtype
from tokenmill.loader.dtype import resolve_kv_cache_dtype


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float", torch.float32),  # vLLM's aliases
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),  # LLM(dtype=torch.bfloat16)
    ],
)
def test_explicit_dtype(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert resolve_dtype(name, "cpu") is expected
    assert resolve_dtype(name, torch.device("cuda")) is expected


def test_unknown_dtype_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match="unknown dtype 'fp8': choose one of auto, float32, bfloat16, float16"
    ):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (frozenset({"avx2", "avx512f"}), torch.float32),
        (frozenset({"avx512f", "avx512_bf16"}), torch.bfloat16),
        (frozenset({"amx_bf16"}), torch.bfloat16),
        (frozenset({"fp", "asimd", "bf16"}), torch.bfloat16),
        (frozenset(), torch.float32),
    ],
)
def test_auto_on_cpu_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], expected: torch.dtype
) -> None:
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: flags)
    assert resolve_dtype("auto", "cpu") is expected


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_auto_keeps_float32_for_cpu_quantized_models_whose_kernels_compute_in_it(
    monkeypatch: pytest.MonkeyPatch, quantization: str
) -> None:
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_dtype("auto", "cpu", quantization) is torch.float32
    assert resolve_dtype("bfloat16", "cpu", quantization) is torch.bfloat16  # asked for: given
    assert resolve_dtype("auto", "cpu") is torch.bfloat16


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_gpu(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_dtype("auto", "cuda:0") is expected


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n", frozenset({"fpu", "avx2", "avx512_bf16"})),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", frozenset({"fp", "asimd", "bf16"})),
        ("processor\t: 0\n", frozenset()),
    ],
)
def test_cpu_flags_from_cpuinfo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpuinfo: str, expected: frozenset[str]
) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    monkeypatch.setattr(build, "CPUINFO", fake)
    build.cpu_flags.cache_clear()
    try:
        assert build.cpu_flags() == expected
    finally:
        build.cpu_flags.cache_clear()


@pytest.mark.parametrize(
    ("name", "model_dtype", "device", "quantization", "expected"),
    [
        ("auto", torch.float32, "cpu", None, torch.float32),  # float models match transformers exactly
        ("auto", torch.float32, "cpu", "gguf", torch.float16),  # quantized on CPU: half the bytes read
        ("auto", torch.float32, "cpu", "int8", torch.float16),
        ("auto", torch.bfloat16, "cpu", None, torch.bfloat16),  # the model's, as vLLM
        ("auto", torch.bfloat16, "cpu", "int8", torch.bfloat16),
        ("auto", torch.bfloat16, "cuda", None, torch.bfloat16),
        ("float32", torch.float32, "cpu", "gguf", torch.float32),
        ("float16", torch.float32, "cpu", None, torch.float16),
        ("float16", torch.bfloat16, "cpu", None, torch.float16),
        ("bfloat16", torch.bfloat16, "cpu", None, torch.bfloat16),
        ("bfloat16", torch.float32, "cpu", "gguf", torch.bfloat16),
    ],
)
def test_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, device: str, quantization: str | None, expected: torch.dtype
) -> None:
    assert resolve_kv_cache_dtype(name, model_dtype, device, quantization) == expected


def test_kv_cache_dtypes_the_kernels_do_not_read_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported on cuda: .* pass --kv-cache-dtype auto"):
        resolve_kv_cache_dtype("float16", torch.bfloat16, "cuda", None)
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8': choose one of auto, float32"):
        resolve_kv_cache_dtype("fp8", torch.float32, "cpu", None)
