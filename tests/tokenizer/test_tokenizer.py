import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase

from tokenmill.loader import ModelSource, resolve_model
from tokenmill.tokenizer import (
    GenerationDefaults,
    load_generation_config,
    load_tokenizer,
    longest_token_bytes,
)

SAMPLES = [
    "Hello world",
    "  leading spaces and\ttabs\nnew lines",
    "<|im_start|>user\nHi there<|im_end|>",
    "Unicode: café, 東京, emoji 🙂",
    "def f(x):\n    return x ** 2",
]


def test_gguf_tokenizer_matches_smollm2_vocabulary(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(smollm2_tokenizer) == 49152
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    assert smollm2_tokenizer("Hello world").input_ids == [19556, 905]
    assert smollm2_tokenizer.chat_template is not None


def test_directory_tokenizer_encodes_like_the_gguf_one(
    smollm2_hf_dir: Path, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = load_tokenizer(resolve_model(str(smollm2_hf_dir)))
    reference = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    for text in SAMPLES:
        ids = smollm2_tokenizer(text).input_ids
        assert tokenizer(text).input_ids == ids == reference(text).input_ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template


def test_gguf_tokenizers_are_independent_copies(smollm2_source: ModelSource) -> None:
    first = load_tokenizer(smollm2_source, chat_template="{{ 'custom' }}")
    second = load_tokenizer(smollm2_source)
    assert first.chat_template == "{{ 'custom' }}"
    assert second.chat_template is not None and "im_start" in second.chat_template


def test_chat_template_from_a_file(smollm2_source: ModelSource, tmp_path: Path) -> None:
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = load_tokenizer(smollm2_source, chat_template=str(template_file))
    assert tokenizer.chat_template == template_file.read_text()


def test_missing_chat_template_file(smollm2_source: ModelSource) -> None:
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        load_tokenizer(smollm2_source, chat_template="/no/such/template.jinja")


def test_generation_defaults_of_the_gguf(smollm2_source: ModelSource) -> None:
    assert load_generation_config(smollm2_source) == GenerationDefaults(eos_token_ids=frozenset({2}))


def model_dir(tmp_path: Path, config: dict, generation_config: dict | None = None) -> ModelSource:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return ModelSource(name="m", path=tmp_path)


def test_generation_config_wins(tmp_path: Path, smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    generation_config = {
        "eos_token_id": [2, 7],
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "do_sample": True,
    }
    source = model_dir(tmp_path, {"eos_token_id": 5}, generation_config)
    defaults = load_generation_config(source, tokenizer=copy.deepcopy(smollm2_tokenizer))
    assert defaults.eos_token_ids == frozenset({2, 7})
    assert defaults.sampling_defaults() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert defaults.repetition_penalty is None and defaults.max_new_tokens is None


def test_the_tokenizer_eos_stays_beside_the_generation_config_ones(
    tmp_path: Path, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    # As vLLM: generation_config's eos ids stop generation too, but never replace the tokenizer's.
    source = model_dir(tmp_path, {"eos_token_id": 5}, {"eos_token_id": [7, 8]})
    defaults = load_generation_config(source, tokenizer=copy.deepcopy(smollm2_tokenizer))
    assert defaults.eos_token_ids == frozenset({2, 7, 8})


def test_eos_from_config_json_without_generation_config(
    tmp_path: Path, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    defaults = load_generation_config(
        model_dir(tmp_path, {"eos_token_id": 5}), copy.deepcopy(smollm2_tokenizer)
    )
    assert defaults == GenerationDefaults(eos_token_ids=frozenset({2, 5}))


def test_sampling_param_defaults_name_max_new_tokens_max_tokens() -> None:
    defaults = GenerationDefaults(temperature=0.7, max_new_tokens=64)
    assert defaults.sampling_param_defaults() == {"temperature": 0.7, "max_tokens": 64}


def test_eos_from_the_tokenizer_last(tmp_path: Path, smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    source = model_dir(tmp_path, {}, {"temperature": 0.3})
    defaults = load_generation_config(source, tokenizer=copy.deepcopy(smollm2_tokenizer))
    assert defaults.eos_token_ids == frozenset({2})
    assert defaults.temperature == 0.3


def test_a_gguf_without_tokenizer_metadata_is_refused_clearly(tiny_gguf: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="holds no tokenizer .*Hugging Face model directory"):
        load_tokenizer(resolve_model(str(tiny_gguf("llama"))))


def test_tokenizer_from_a_complete_tiny_gguf(tiny_gguf: Callable[..., Path]) -> None:
    tokenizer = load_tokenizer(resolve_model(str(tiny_gguf("qwen2", with_tokenizer=True))))
    assert len(tokenizer) == 49152
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer.eos_token_id == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_tokenizer_is_the_one_auto_tokenizer_builds(tiny_gguf: Callable[..., Path], arch: str) -> None:
    gguf_file = tiny_gguf(arch, with_tokenizer=True)
    ours = load_tokenizer(resolve_model(str(gguf_file)))
    reference = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    for text in SAMPLES:
        assert ours(text).input_ids == reference(text).input_ids
        assert ours.decode(reference(text).input_ids) == reference.decode(reference(text).input_ids)
    assert ours.all_special_tokens == reference.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.chat_template == reference.chat_template


def test_sentencepiece_style_gguf_tokenizer_is_the_one_auto_tokenizer_builds(tmp_path: Path) -> None:
    # tokenizer.ggml.model "llama" (Llama 2, Mistral): scored pieces with byte fallback, BOS added.
    pieces = ["▁", "a", "e", "h", "l", "o", "t", "w", "r", "d", "▁t", "▁the", "he", "llo", "▁hello", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    writer = GGUFWriter(tmp_path / "sp.gguf", "llama")
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_tokenizer(resolve_model(str(tmp_path / "sp.gguf")))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["hello world", " the world", "Hello  wörld\n", *SAMPLES]:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids and ids[0] == 1
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "text", [*SAMPLES, " " * 5000, "\n" * 3000, "東京" * 500, "🙂" * 400, "a" * 4000, "<|im_end|>" * 300]
)
def test_no_token_covers_more_text_than_the_longest_token_bytes(
    smollm2_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    bound = longest_token_bytes(smollm2_tokenizer)
    assert bound is not None
    num_tokens = len(smollm2_tokenizer.encode(text, add_special_tokens=False))
    assert len(text.encode("utf-8")) <= num_tokens * bound


def test_a_whitespace_stripping_added_token_has_no_byte_bound(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_tokens([AddedToken("<sep>", rstrip=True)])
    # "<sep>" and the run of spaces after it are one token: no bound on the bytes a token covers.
    assert len(tokenizer.encode("<sep>" + " " * 1000, add_special_tokens=False)) == 1
    assert longest_token_bytes(tokenizer) is None
