"""Backend selection: Triton on CUDA in fp16/bf16, SDPA otherwise, TOKENMILL_ATTENTION_BACKEND to force."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.cpu import TorchSDPABackend
from tokenmill.attention.selector import BACKEND_ENV, get_attention_backend
from tokenmill.attention.triton_interpret import interpret_without_cuda

interpret_without_cuda()  # a forced Triton backend imports the kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_cpu_gets_sdpa(dtype: torch.dtype | None) -> None:
    assert isinstance(get_attention_backend(CPU, dtype), TorchSDPABackend)


def test_cuda_float32_gets_sdpa() -> None:
    assert isinstance(get_attention_backend(CUDA, torch.float32), TorchSDPABackend)


@pytest.mark.skipif(not has_triton(), reason="needs triton")
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_cuda_half_precision_gets_triton(dtype: torch.dtype | None) -> None:
    from tokenmill.attention.triton_backend import TritonBackend

    backend = get_attention_backend(CUDA, dtype)
    assert isinstance(backend, TritonBackend) and not backend.fp32_kernels


def test_env_forces_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "SDPA")
    assert isinstance(get_attention_backend(CUDA, torch.bfloat16), TorchSDPABackend)


@pytest.mark.skipif(not has_triton(), reason="needs triton")
def test_env_forces_triton_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.attention.triton_backend import TritonBackend

    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = get_attention_backend(CPU, torch.float32)
    assert isinstance(backend, TritonBackend) and backend.fp32_kernels


def test_forced_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_attention_backend(CPU)


def test_unknown_backend_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match="auto, sdpa, triton"):
        get_attention_backend(CPU)
