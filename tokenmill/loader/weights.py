"""A model's weights as (Hugging Face name, tensor) pairs, whatever the checkpoint format."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from tokenmill.loader.safetensors_loader import count_safetensors_tensors, iter_safetensors_weights
from tokenmill.loader.source import ModelSource


def iter_weights(
    source: ModelSource, dtype: torch.dtype, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every checkpoint tensor of `source` under its HF transformers name, in HF layout, converted to
    `dtype`, one at a time (peak memory stays about one copy of the model), with a progress bar.

    `lm_head.weight` is absent when the checkpoint ties it to `model.embed_tokens.weight`. A GGUF's tensors
    named in `skip` are left out (layers that keep the file's blocks, `--quantization gguf`).
    """
    if source.gguf_file is not None:
        from tokenmill.loader.gguf_loader import count_gguf_tensors, iter_gguf_weights  # needs `gguf`

        num_tensors = count_gguf_tensors(source.gguf_file) - len(skip)
        weights = iter_gguf_weights(source.gguf_file, dtype, skip)
    else:
        num_tensors = count_safetensors_tensors(source.path)
        weights = iter_safetensors_weights(source.path, dtype)
    # disable=None: shown on a terminal, silent in logs and captured output.
    with tqdm(total=num_tensors, desc=f"Loading {source.name}", unit="tensor", disable=None) as progress:
        for name, tensor in weights:
            yield name, tensor
            progress.update()
