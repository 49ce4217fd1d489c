"""The profiling forward's batch (GPU KV sizing): a whole token budget, in sequences the model allows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tokenmill import LLM
from tokenmill.worker.model_runner import dummy_prefill


def test_a_budget_past_max_model_len_is_split_into_full_sequences(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    ids, positions, metadata, num_blocks = dummy_prefill(600, 256, 16, torch.device("cpu"))
    assert metadata.query_lens == [256, 256, 88] and metadata.query_start_loc == [0, 256, 512, 600]
    assert num_blocks == 16 + 16 + 6 and ids.shape == positions.shape == (600,)
    assert positions[256].item() == 0 and positions[-1].item() == 87
    assert sorted(metadata.slot_mapping.tolist()) == list(range(600))  # each token its own slot
    # The model runs it (as the GPU profile does, there with the peak memory measured).
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    runner = llm.engine.core.runner
    runner.allocate_kv_cache(num_blocks, capture_graphs=False)
    with torch.inference_mode():
        hidden = runner.model(ids, positions, metadata)
    assert hidden.shape == (600, 64) and torch.isfinite(hidden).all()
