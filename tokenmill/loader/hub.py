"""Hugging Face hub downloads: a model id becomes a local snapshot directory."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
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


class ModelNotFoundError(FileNotFoundError):
    """The model argument names nothing that can be loaded; the message says what to do instead."""


def download_from_hub(model_id: str, download_dir: str | None = None, revision: str | None = None) -> Path:
    """The local snapshot of `model_id`, downloaded (with a progress bar) unless already cached."""
    try:
        snapshot = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
        )
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"model {model_id} is gated on the hub: accept its license on huggingface.co and set HF_TOKEN, "
            "or pass a local path"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"model {model_id} not found on the hub: check the id (org/name), set HF_TOKEN for a private "
            "repository, or pass a local path"
        ) from error
    except RevisionNotFoundError as error:
        raise ModelNotFoundError(
            f"revision {revision!r} of model {model_id} not found on the hub: pass an existing branch, "
            "tag or commit with --revision"
        ) from error
    except LocalEntryNotFoundError as error:
        where = f" in {download_dir}" if download_dir else ""
        raise ModelNotFoundError(
            f"model {model_id} not found locally{where} and the hub is unreachable: pass a local path, "
            "or pre-download it into --download-dir"
        ) from error
    return Path(snapshot)
