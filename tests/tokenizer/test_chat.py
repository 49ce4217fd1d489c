import copy
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from tokenmill.tokenizer import apply_chat_template, read_chat_template

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def test_string_messages(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = apply_chat_template(smollm2_tokenizer, [{"role": "user", "content": "Hi"}])
    assert prompt == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_without_generation_prompt(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = apply_chat_template(smollm2_tokenizer, conversation, add_generation_prompt=False)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_content_parts_are_joined(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = apply_chat_template(smollm2_tokenizer, [{"role": "user", "content": parts}])
    as_text = apply_chat_template(smollm2_tokenizer, [{"role": "user", "content": "first\nsecond"}])
    assert as_parts == as_text


def test_non_text_content_parts_are_refused(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValueError, match="content part of type 'image_url' is not supported"):
        apply_chat_template(smollm2_tokenizer, [{"role": "user", "content": parts}])


def test_continue_final_message(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    prompt = apply_chat_template(smollm2_tokenizer, conversation, continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\n1, 2,")


def test_inline_template_and_kwargs(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    template = "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}{{ suffix }}"
    conversation = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    prompt = apply_chat_template(smollm2_tokenizer, conversation, chat_template=template, suffix="END")
    assert prompt == "user=a;END"


def test_template_file_and_tools(smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    template_file = tmp_path / "tools.jinja"
    template_file.write_text(
        "{% for t in tools %}{{ t['function']['name'] }} {% endfor %}{{ messages[0]['content'] }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    prompt = apply_chat_template(
        smollm2_tokenizer, [{"role": "user", "content": "q"}], chat_template=str(template_file), tools=tools
    )
    assert prompt == "get_weather q"


def test_no_chat_template(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template: pass one with --chat-template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])


def test_read_chat_template(tmp_path: Path) -> None:
    assert read_chat_template("{{ x }}") == "{{ x }}"
    (tmp_path / "t.jinja").write_text("{% if x %}y{% endif %}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{% if x %}y{% endif %}"
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
