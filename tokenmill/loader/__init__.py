"""Model loading: a model argument becomes a source, a config and a stream of named weights."""

from tokenmill.loader.dtype import resolve_dtype
from tokenmill.loader.hf_config import load_hf_config, sliding_window
from tokenmill.loader.hub import ModelNotFoundError
from tokenmill.loader.source import ModelSource, resolve_model, resolve_tokenizer
from tokenmill.loader.weights import iter_weights

__all__ = [
    "ModelNotFoundError",
    "ModelSource",
    "iter_weights",
    "load_hf_config",
    "resolve_dtype",
    "resolve_model",
    "resolve_tokenizer",
    "sliding_window",
]
