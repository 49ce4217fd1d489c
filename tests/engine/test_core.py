"""EngineCore's start-up decisions: the device, the served context length, the quantization hints."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from tokenmill.config import SchedulerConfig
from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.engine.core import (
    EngineCore,
    gguf_quantization_hint,
    quantized_dtype_hint,
    resolve_device,
    resolve_max_model_len,
)
from tokenmill.kernels.cpu import kernel_library
from tokenmill.loader import ModelSource, resolve_model


def test_cuda_without_cuda_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*'cpu' or 'auto'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_missing_gpu_index_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:1' does not exist: this machine has 1 GPUs"):
        resolve_device("cuda:1")


def test_max_model_len_is_capped_at_the_model_limit(caplog: pytest.LogCaptureFixture) -> None:
    config = LlamaConfig(max_position_embeddings=512)
    assert resolve_max_model_len(None, config) == 512
    assert resolve_max_model_len(256, config) == 256
    assert resolve_max_model_len(1024, config) == 512
    assert "longer than the model's limit of 512 tokens" in caplog.text


@pytest.mark.parametrize("requested", [None, 64, 4096])
def test_a_sliding_window_caps_max_model_len_with_one_warning(
    requested: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    config = MistralConfig(max_position_embeddings=2048, sliding_window=32)
    assert resolve_max_model_len(requested, config) == 32
    assert [r.getMessage() for r in caplog.records] == [
        "the model uses sliding-window attention (window 32 tokens), which tokenmill does not implement: "
        "serving 32-token contexts"
    ]


def test_a_shorter_request_than_the_window_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_max_model_len(16, MistralConfig(sliding_window=32)) == 16
    assert not caplog.records


def test_a_gguf_dequantized_on_a_cpu_with_the_block_kernels_names_the_flag_that_keeps_them() -> None:
    source = resolve_model(None)  # the embedded default model: a Q4_1 GGUF
    cpu = torch.device("cpu")
    if kernel_library() is None:
        pytest.skip("this CPU cannot run the block kernels, so there is nothing to suggest")
    hint = gguf_quantization_hint(None, source, cpu)
    assert hint is not None and "--quantization gguf" in hint
    assert gguf_quantization_hint("gguf", source, cpu) is None
    assert gguf_quantization_hint("int8", source, cpu) is None  # a choice was made
    assert gguf_quantization_hint(None, source, torch.device("meta")) is None  # not a CPU
    not_a_gguf = ModelSource(name="dir", path=source.path, gguf_file=None)
    assert gguf_quantization_hint(None, not_a_gguf, cpu) is None


def test_a_cpu_quantized_model_in_half_precision_is_told_to_leave_the_dtype_at_auto() -> None:
    cpu = torch.device("cpu")
    hint = quantized_dtype_hint("gguf", torch.bfloat16, cpu)
    assert hint is not None and "--dtype bfloat16" in hint and "leave --dtype at auto" in hint
    assert quantized_dtype_hint("int8", torch.float16, cpu) is not None
    assert quantized_dtype_hint("gguf", torch.float32, cpu) is None
    assert quantized_dtype_hint(None, torch.bfloat16, cpu) is None


def test_the_token_budget_left_unset_is_the_devices() -> None:
    """512 tokens a step on CPU (a burst of prompts prefilled a few at a time: the first ones decode sooner),
    2048 on a GPU; a budget that was asked for is kept on both."""
    unset = SchedulerConfig()
    with pytest.raises(ValueError, match="set per device"):
        _ = unset.token_budget
    assert unset.for_device("cpu").token_budget == 512
    assert unset.for_device("cuda").token_budget == 2048
    assert SchedulerConfig(max_num_batched_tokens=4096).for_device("cpu").token_budget == 4096
    engine = EngineArgs(device="cpu", load_format="dummy", max_model_len=256, kv_cache_memory=8 << 20)
    core = EngineCore(engine.create_engine_config())
    assert core.scheduler.config.token_budget == 512
    assert core.runner.config.scheduler.token_budget == 512
