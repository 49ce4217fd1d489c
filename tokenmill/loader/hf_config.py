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


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window, in tokens, that transformers applies to some layer of `config`, or None.

    Mistral slides in every layer while `sliding_window` is set. Qwen2 and Qwen3 configs carry a window
    they use only with `use_sliding_window`, and then only in the layers `layer_types` names.
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)
