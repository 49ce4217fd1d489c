"""The engine end to end with the Triton backend (in triton's interpreter without CUDA) against SDPA.

A tiny random float32 model, so every step goes through the kernels: prefill, chunks after cached context,
chunked prefill mixed with decodes, and decode-only steps (on CUDA, replayed from CUDA graphs). Greedy
tokens must match the SDPA backend's exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.attention.triton_interpret import interpret_without_cuda

interpret_without_cuda()  # before triton is imported
pytest.importorskip("triton")

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.attention.backend import AttentionMetadata  # noqa: E402
from tokenmill.attention.selector import BACKEND_ENV  # noqa: E402
from tokenmill.attention.triton_backend import TritonBackend  # noqa: E402
from tokenmill.kernels import gpu, triton_layer_ops  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SHARED = " ".join(f"word{i}" for i in range(24))
PROMPTS = [SHARED + " alpha", "Hi", SHARED + " beta gamma", "The quick brown fox jumps over"]


def generate(model: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    monkeypatch.setenv(BACKEND_ENV, backend)
    # enforce_eager: on a GPU, decode steps would replay CUDA graphs, past the forward this test records.
    llm = LLM(
        str(model),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory=4 << 20,
        max_num_batched_tokens=32,
        enforce_eager=True,
    )
    if backend == "triton":
        attention = llm.engine.core.runner.attention_layers[0].backend
        assert isinstance(attention, TritonBackend)
        steps: list[AttentionMetadata] = []
        forward = attention.forward

        def recording_forward(*args: Any) -> torch.Tensor:
            steps.append(args[4])
            return forward(*args)

        monkeypatch.setattr(attention, "forward", recording_forward)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    if backend == "triton":
        assert any(all(q == 1 for q in m.query_lens) for m in steps), "no decode-only step"
        pairs = [(c, q) for m in steps for c, q in zip(m.context_lens, m.query_lens, strict=True)]
        assert any(c > 0 and q > 1 for c, q in pairs), "no chunk after cached context"
        assert any(1 in m.query_lens and max(m.query_lens) > 1 for m in steps), "no mixed step"
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_tokens_match_sdpa(
    arch: str, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model_dir(arch)
    assert generate(model, "triton", monkeypatch) == generate(model, "sdpa", monkeypatch)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: per-head q/k norms on strided views
def test_greedy_tokens_match_with_triton_layer_ops(
    arch: str, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every op of the model in our Triton kernels (RMSNorm with its residual, rotary, SiLU-and-mul and
    attention), forced onto float32 CPU tensors in the interpreter: the layers' wiring end to end."""
    model = tiny_model_dir(arch)
    expected = generate(model, "sdpa", monkeypatch)
    calls: list[str] = []
    for name in ("rms_norm", "silu_and_mul", "rotary"):
        original = getattr(triton_layer_ops, name)
        spy = lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args)  # noqa: E731
        monkeypatch.setattr(triton_layer_ops, name, spy)
    monkeypatch.setenv(gpu.LAYER_OPS_ENV, "1")
    gpu._mode.cache_clear()
    try:
        assert generate(model, "triton", monkeypatch) == expected
    finally:
        gpu._mode.cache_clear()
    assert {"rms_norm", "silu_and_mul", "rotary"} <= set(calls)
