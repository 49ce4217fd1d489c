"""Tokenizers, chat templates and generation defaults."""

from tokenmill.tokenizer.chat import apply_chat_template, read_chat_template
from tokenmill.tokenizer.tokenizer import (
    GenerationDefaults,
    load_generation_config,
    load_tokenizer,
    longest_token_bytes,
    warn_if_vocabulary_outgrows,
)

__all__ = [
    "GenerationDefaults",
    "apply_chat_template",
    "load_generation_config",
    "load_tokenizer",
    "longest_token_bytes",
    "read_chat_template",
    "warn_if_vocabulary_outgrows",
]
