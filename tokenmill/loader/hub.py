"""Hugging Face hub downloads: a model id becomes a local snapshot directory or GGUF file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# What the engine reads from a repository: weights, configs, tokenizer and chat template files.
# Other weight formats (.bin, .pt, .gguf, onnx) are skipped so a download fetches one copy of the model.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "*.txt",
]
# A tokenizer repository's files (--tokenizer): the same without the weights.
TOKENIZER_ALLOW_PATTERNS = [pattern for pattern in HUB_ALLOW_PATTERNS if pattern != "*.safetensors"]
# Mistral repositories also ship their own-format copy of the weights (consolidated.safetensors) beside
# the Hugging Face shards; Llama repositories keep originals under original/.
HUB_IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]


class ModelNotFoundError(FileNotFoundError):
    """The model argument names nothing that can be loaded; the message says what to do instead."""


def download_from_hub(
    model_id: str,
    download_dir: str | None = None,
    revision: str | None = None,
    allow_patterns: list[str] = HUB_ALLOW_PATTERNS,
    kind: str = "model",
) -> Path:
    """The local snapshot of repository `model_id` (the files `allow_patterns` match), downloaded (with a
    progress bar) unless cached. `kind` names it in errors ("model", "tokenizer")."""
    with _explained_hub_errors(model_id, download_dir, revision, kind):
        snapshot = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=allow_patterns,
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    return Path(snapshot)


def download_gguf_from_hub(
    model_id: str, filename: str, download_dir: str | None = None, revision: str | None = None
) -> Path:
    """The local copy of GGUF file `filename` of repository `model_id`, downloaded unless cached."""
    with _explained_hub_errors(f"{model_id}/{filename}", download_dir, revision):
        return Path(hf_hub_download(model_id, filename, revision=revision, cache_dir=download_dir))


@contextmanager
def _explained_hub_errors(
    model: str, download_dir: str | None, revision: str | None, kind: str = "model"
) -> Iterator[None]:
    """Turn huggingface_hub's errors into ones that say what to do."""
    try:
        yield
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"{kind} {model} is gated on the hub: accept its license on huggingface.co and set HF_TOKEN, "
            "or pass a local path"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"{kind} {model} not found on the hub: check the id (org/name), set HF_TOKEN for a private "
            "repository, or pass a local path"
        ) from error
    except RevisionNotFoundError as error:
        flag = "--revision" if kind == "model" else f"--{kind}-revision"
        raise ModelNotFoundError(
            f"revision {revision!r} of {kind} {model} not found on the hub: pass an existing branch, "
            f"tag or commit with {flag}"
        ) from error
    except RemoteEntryNotFoundError as error:
        raise ModelNotFoundError(
            f"file {model} not found on the hub: check the file name against the repository's files"
        ) from error
    except LocalEntryNotFoundError as error:
        where = f" in {download_dir}" if download_dir else ""
        raise ModelNotFoundError(
            f"{kind} {model} not found locally{where} and the hub is unreachable: pass a local path, "
            "or pre-download it into --download-dir"
        ) from error
