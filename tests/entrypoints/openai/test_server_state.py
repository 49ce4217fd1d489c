"""server_state.py's tokenizer load in the API process (the model itself loads in the core process)."""

from __future__ import annotations

import copy
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
