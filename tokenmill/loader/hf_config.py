"""The model's Hugging Face config, from config.json or (`gguf_config`) from a GGUF file's metadata."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from tokenmill.loader.source import ModelSource


def load_hf_config(source: ModelSource, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of `source` (model_type llama, mistral, qwen2, qwen3), with `overrides`.

    The checkpoint's own dtype (`config.dtype`) is left as it says; the compute dtype is chosen apart.
    """
    if source.gguf_file is not None:
        from tokenmill.loader.gguf_config import cached_gguf_config  # needs `gguf`: GGUF models only

        cached = cached_gguf_config(source.gguf_file, source.gguf_file.stat().st_mtime_ns)
        config: PretrainedConfig = copy.deepcopy(cached)
    else:
        config = AutoConfig.from_pretrained(str(source.path))
    if overrides:
        config.update(overrides)
    return config
