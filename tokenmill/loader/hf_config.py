"""The model's Hugging Face config, from config.json or from a GGUF file's metadata."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from tokenmill.loader.gguf_loader import gguf_architecture
from tokenmill.loader.source import ModelSource


@lru_cache(maxsize=2)
def _cached_gguf_config(gguf_file: Path, mtime_ns: int) -> PretrainedConfig:
    gguf_architecture(gguf_file)  # an unsupported architecture fails here, with the remedy
    return AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def load_hf_config(source: ModelSource, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of `source` (model_type llama, qwen2, qwen3, ...), with `overrides` applied.

    The checkpoint's own dtype (`config.dtype`) is left as it says; the compute dtype is chosen apart.
    """
    if source.gguf_file is not None:
        # transformers re-parses the whole GGUF metadata (seconds); later engines in the process reuse it.
        cached = _cached_gguf_config(source.gguf_file, source.gguf_file.stat().st_mtime_ns)
        config: PretrainedConfig = copy.deepcopy(cached)
    else:
        config = AutoConfig.from_pretrained(str(source.path))
    if overrides:
        config.update(overrides)
    return config
