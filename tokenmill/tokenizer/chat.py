"""Chat templates: OpenAI-style messages rendered to the prompt text the model was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tokenmill.content_parts import TEXT_PART_TYPES


def is_inline_template(template: str) -> bool:
    return "{{" in template or "{%" in template


def read_chat_template(template: str) -> str:
    """A chat template given as an inline Jinja string or as the path of a file holding one."""
    if is_inline_template(template):
        return template
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text()
    raise ValueError(
        f"chat template {template!r} is neither an existing file nor a Jinja template: pass the path of a "
        "template file or the template itself"
    )


def text_content(content: Any) -> Any:
    """Message content as text: OpenAI content parts ([{"type": "text", "text": ...}]) joined by newlines;
    strings and None pass through."""
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES:
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"content part of type {kind!r} is not supported: this model takes text parts only"
            )
    return "\n".join(texts)


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[Any] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `conversation` with `chat_template` (a file path or inline Jinja) or the tokenizer's own.

    With `continue_final_message` the last (assistant) message is left open for the model to continue,
    so no generation prompt is added after it.
    """
    template = read_chat_template(chat_template) if chat_template is not None else None
    if template is None and not tokenizer.chat_template:
        raise ValueError(
            "the model's tokenizer has no chat template: pass one with --chat-template (a Jinja file or "
            "string), or use the completions API"
        )
    messages = [{**message, "content": text_content(message.get("content"))} for message in conversation]
    rendered = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        **template_kwargs,
    )
    if not isinstance(rendered, str):
        raise TypeError(f"chat template rendered {type(rendered).__name__}, expected str")
    return rendered
