"""server_state.py: the tokenizer and sampling defaults that the API process loads (not the model)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tokenmill.entrypoints.cli_args import parse_serve_args
from tokenmill.entrypoints.openai.server_state import ServerState


def test_the_api_process_loads_the_tokenizer_flag_and_the_models_generation_defaults(
    smollm2_gguf: Path, smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = "{{ messages[0]['content'] }}!"
    tokenizer.save_pretrained(tmp_path)
    plain = ServerState(parse_serve_args([str(smollm2_gguf)], environ={}))._load_tokenizer()
    args = parse_serve_args([str(smollm2_gguf), "--tokenizer", str(tmp_path)], environ={})
    loaded = ServerState(args)._load_tokenizer()
    assert loaded.tokenizer.chat_template == "{{ messages[0]['content'] }}!"
    assert plain.tokenizer.chat_template != loaded.tokenizer.chat_template
    assert loaded.root == plain.root == str(smollm2_gguf)  # the model, not the tokenizer, names the root
    assert loaded.eos_token_ids == plain.eos_token_ids


def test_generation_overrides_go_over_the_models_defaults_or_alone_with_vllm(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8}))
    override = ["--override-generation-config", '{"temperature": 0.2, "max_new_tokens": 9}']

    def sampling(*flags: str) -> dict[str, object]:
        args = parse_serve_args([str(model_dir), *flags], environ={})
        return ServerState(args)._load_tokenizer().default_sampling

    assert sampling() == {"temperature": 0.7, "top_p": 0.8}
    assert sampling(*override) == {"temperature": 0.2, "top_p": 0.8, "max_tokens": 9}
    assert sampling("--generation-config", "vllm", *override) == {"temperature": 0.2, "max_tokens": 9}
