"""LLMEngine: the offline engine: an in-process EngineCore with the frontend's input and output sides."""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.processor import InputProcessor, PromptType
from tokenmill.loader import resolve_tokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import load_generation_config, load_tokenizer, warn_if_vocabulary_outgrows


class LLMEngine:
    def __init__(self, config: EngineConfig, chat_template: str | None = None) -> None:
        self.config = config
        self.core = EngineCore(config)
        model = config.model
        tokenizer_source = resolve_tokenizer(
            model.tokenizer, self.core.source, model.download_dir, model.tokenizer_revision
        )
        self.tokenizer = load_tokenizer(tokenizer_source, chat_template)
        warn_if_vocabulary_outgrows(self.tokenizer, self.core.vocab_size)
        self.generation_defaults = load_generation_config(self.core.source, self.tokenizer)
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.core.max_model_len,
            self.core.vocab_size,
            self.generation_defaults.eos_token_ids,
            strict_max_tokens=False,
        )
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        processed = self.input_processor.process(request_id, prompt, params)
        self.output_processor.add_request(processed, request_id, params)
        for core_request in processed.core_requests:
            self.core.add_request(core_request)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort_request(request_id))

    def step(self) -> list[RequestOutput]:
        outputs = self.core.step()
        request_outputs, to_abort = self.output_processor.process_outputs(outputs)
        self.core.abort_requests(to_abort)
        return request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()
