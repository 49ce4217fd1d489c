"""The model's tokenizer and its generation defaults (eos ids, sampling settings)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenmill.loader.source import ModelSource
from tokenmill.sampling_params import from_generation_config
from tokenmill.tokenizer.chat import read_chat_template

GENERATION_CONFIG_FILE = "generation_config.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model's generation_config says; None where it says nothing."""

    eos_token_ids: frozenset[int] = frozenset()  # with the tokenizer's eos, which always ends generation
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    def sampling_defaults(self) -> dict[str, float | int]:
        """The sampling settings the model's authors chose, by generation_config name."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eos_token_ids"}
        return {name: value for name, value in values.items() if value is not None}

    def sampling_param_defaults(self) -> dict[str, Any]:
        """The same settings by SamplingParams name (max_new_tokens is max_tokens), as vLLM applies them."""
        return from_generation_config(self.sampling_defaults())


@lru_cache(maxsize=2)
def _cached_gguf_tokenizer(gguf_file: Path, mtime_ns: int) -> PreTrainedTokenizerBase:
    # The GGUF's metadata defines the whole tokenizer, so the generic fast class is the right one.
    # AutoTokenizer would first rebuild the model's config through transformers' slow GGUF path for
    # Llama/Qwen files (5 s for a 49k vocabulary) only to choose that class.
    return PreTrainedTokenizerFast.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The fast tokenizer of `source` (from its directory or its GGUF metadata); `chat_template` (a file
    path or inline Jinja) replaces the model's own."""
    if source.gguf_file is not None:
        _check_gguf_has_tokenizer(source.gguf_file)
        # Building the tokenizer from GGUF metadata takes ~0.4 s; copies of a cached one take ~0.1 s.
        cached = _cached_gguf_tokenizer(source.gguf_file, source.gguf_file.stat().st_mtime_ns)
        tokenizer: PreTrainedTokenizerBase = copy.deepcopy(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def warn_if_vocabulary_outgrows(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """A tokenizer with ids the model has no embedding for (a --tokenizer of another model) is logged at
    start-up: every prompt that holds one of them is refused."""
    if len(tokenizer) > vocab_size:
        logger.warning(
            "the tokenizer has %d tokens but the model's vocabulary only %d: prompts holding ids from %d "
            "on are refused (pass the model's own tokenizer, or one of the same vocabulary)",
            len(tokenizer),
            vocab_size,
            vocab_size,
        )


def _check_gguf_has_tokenizer(gguf_file: Path) -> None:
    from tokenmill.loader.gguf_loader import gguf_metadata  # needs `gguf`: GGUF models only

    if gguf_metadata(gguf_file, "tokenizer.ggml.tokens") is None:
        raise ValueError(
            f"{gguf_file} holds no tokenizer (no tokenizer.ggml.tokens metadata): pass a GGUF converted "
            "with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes it) or a Hugging Face model "
            "directory"
        )


def longest_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """An upper bound on the bytes of text one token stands for (a text of more than n times this many
    UTF-8 bytes needs more than n tokens), or None where there is none.

    Each token's string is at least as long in UTF-8 as the text it encodes: byte-level BPE writes one
    character per byte, SentencePiece a 3-byte "▁" per space and "<0xNN>" per fallback byte, and added
    tokens match their own text. An added token that strips the whitespace beside it (lstrip/rstrip) covers
    any run of it: no bound.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    if any(getattr(token, "lstrip", False) or getattr(token, "rstrip", False) for token in added):
        return None
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(token.encode("utf-8")) for token in tokens if token)


def load_generation_config(
    source: ModelSource, tokenizer: PreTrainedTokenizerBase | None = None
) -> GenerationDefaults:
    """The generation defaults of `source`. eos ids are the tokenizer's (`tokenizer`, or the model's) and,
    as in vLLM, those of generation_config.json, else config.json, else the GGUF metadata."""
    generation_config = _read_json(source.path / GENERATION_CONFIG_FILE) if not source.is_gguf else {}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    return GenerationDefaults(
        eos_token_ids=_token_ids(tokenizer.eos_token_id) | _config_eos_token_ids(source, generation_config),
        temperature=generation_config.get("temperature"),
        top_p=generation_config.get("top_p"),
        top_k=generation_config.get("top_k"),
        min_p=generation_config.get("min_p"),
        repetition_penalty=generation_config.get("repetition_penalty"),
        max_new_tokens=generation_config.get("max_new_tokens"),
    )


def _config_eos_token_ids(source: ModelSource, generation_config: dict[str, Any]) -> frozenset[int]:
    eos_token_ids = _token_ids(generation_config.get("eos_token_id"))
    if not eos_token_ids and not source.is_gguf:
        eos_token_ids = _token_ids(_read_json(source.path / "config.json").get("eos_token_id"))
    if not eos_token_ids and source.gguf_file is not None:
        from tokenmill.loader.gguf_loader import gguf_eos_token_ids  # needs `gguf`: GGUF models only

        eos_token_ids = gguf_eos_token_ids(source.gguf_file)
    return eos_token_ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def _token_ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(token_id) for token_id in value)
