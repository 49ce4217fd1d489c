"""The offline API, with vLLM's names: `LLM(...).generate(...)` and `.chat(...)`."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.processor import PromptType
from tokenmill.logging_config import configure_logging
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import apply_chat_template

Conversation = list[dict[str, Any]]


class LLM:
    """Generates completions offline, batching every prompt given through the same engine.

    `model`: a local Hugging Face directory, a .gguf file, a hub id, or None for the embedded default
    (SmolLM2-135M-Instruct). Other keyword arguments are `EngineArgs` fields (max_num_seqs, ...).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int | None = 0,
        chat_template: str | None = None,
        **engine_args: Any,
    ) -> None:
        _check_engine_args(engine_args)
        configure_logging()  # the KV cache size and CUDA graph capture lines, as vLLM's LLM prints them
        args = EngineArgs(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_args)  # type: ignore[arg-type]
        self.engine = LLMEngine(args.create_engine_config(), chat_template=chat_template)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults (temperature, top_p, ...,
        max_new_tokens as max_tokens)."""
        return SamplingParams(**self.engine.generation_defaults.sampling_param_defaults())

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completes each prompt (a string, a list of token ids or {"prompt_token_ids": [...]})."""
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        request_ids: list[str] = []
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except BaseException:
            for request_id in request_ids:  # a bad prompt fails the whole call: the ones before it too
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Applies the chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            _check_conversation(conversation)
            text = apply_chat_template(
                self.engine.tokenizer,
                list(conversation),  # type: ignore[arg-type]
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            # The template already wrote any BOS token: tokenize without adding special tokens again.
            ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, Sequence) or not all(
            isinstance(params, SamplingParams) for params in sampling_params
        ):
            raise ValueError(
                "sampling_params must be a SamplingParams or a list of them (one per prompt), got "
                f"{type(sampling_params).__name__}: pass SamplingParams(max_tokens=..., ...)"
            )
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts")
        return list(sampling_params)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while pending:
                    for output in self.engine.step():
                        if output.finished and output.request_id in pending:
                            finished[output.request_id] = output
                            pending.discard(output.request_id)
                            bar.update(1)
            except BaseException:
                for request_id in pending:
                    self.engine.abort_request(request_id)
                raise
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise ValueError(
            "prompts must be a prompt (a string, a list of token ids or a dict with 'prompt' or "
            f"'prompt_token_ids') or a list of prompts, got {type(prompts).__name__}"
        )
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)  # type: ignore[arg-type]


def _check_conversation(conversation: Iterable[Any]) -> None:
    for message in conversation:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(
                f"each chat message must be a dict with a 'role' (system, user, assistant or tool), "
                f"got {message!r}"
            )


def _check_engine_args(engine_args: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in engine_args:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"LLM() got an unknown engine argument {name!r}{hint}")
