"""Greedy tokens and top-5 logprobs against Hugging Face transformers, float32, same weights (and greedy
under a repetition penalty against its generate)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from tokenmill import LLM, SamplingParams
from tokenmill.engine.outputs import RequestOutput

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors: red,",
    "Water boils at a temperature of",
]
NUM_TOKENS = 32
TOP = 5


def hf_greedy(model_dir: Path, prompt_ids: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Each prompt alone through transformers: greedy tokens and the log_softmax of each step's logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids])
            out = model(input_ids, use_cache=True)
            tokens, logprobs = [], []
            for _ in range(NUM_TOKENS):
                step_logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                token = int(step_logprobs.argmax())
                tokens.append(token)
                logprobs.append(step_logprobs)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            results.append((tokens, logprobs))
    return results


def run_engine(llm: LLM) -> list[RequestOutput]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=TOP)
    return llm.generate(PROMPTS, params, use_tqdm=False)


def assert_matches_hf(outputs: list[RequestOutput], reference_dir: Path) -> None:
    reference = hf_greedy(reference_dir, [o.prompt_token_ids for o in outputs])
    for output, (hf_tokens, hf_logprobs) in zip(outputs, reference, strict=True):
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens, f"greedy tokens differ for {output.prompt!r}"
        assert completion.logprobs is not None and len(completion.logprobs) == NUM_TOKENS
        for ours, theirs in zip(completion.logprobs, hf_logprobs, strict=True):
            values, ids = theirs.topk(TOP)
            for token_id, value in zip(ids.tolist(), values.tolist(), strict=True):
                assert token_id in ours, "a top-5 token of transformers is missing"
                assert abs(ours[token_id].logprob - value) < 1e-3


@pytest.fixture(scope="module")
def smollm2_llm() -> Iterator[LLM]:
    yield LLM(dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_llm: LLM, smollm2_hf_dir: Path) -> None:
    assert_matches_hf(run_engine(smollm2_llm), smollm2_hf_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_safetensors_model_matches_transformers(
    arch: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    model_dir = tiny_model_dir(arch)
    llm = LLM(str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory=16 << 20)
    assert_matches_hf(run_engine(llm), model_dir)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen3", {"attention_bias": True})],
)
def test_tiny_model_with_biases_matches_transformers(
    arch: str, overrides: dict[str, bool], tiny_model_dir: Callable[..., Path]
) -> None:
    # transformers puts attention_bias on q, k, v and o, mlp_bias on gate, up and down.
    model_dir = tiny_model_dir(arch, **overrides)
    llm = LLM(str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory=16 << 20)
    assert_matches_hf(run_engine(llm), model_dir)


def test_repetition_penalty_matches_transformers_generate(tiny_model_dir: Callable[[str], Path]) -> None:
    """Greedy decoding under repetition_penalty, end to end, against transformers' generate. The prompts
    are built so that unpenalized greedy would pick a prompt token next and repeat output tokens later:
    the penalty must cover both the prompt and the output to match."""
    model_dir = tiny_model_dir("qwen3")
    llm = LLM(str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    penalizing = dataclasses.replace(greedy, repetition_penalty=1.3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(
        do_sample=False, repetition_penalty=1.3, max_new_tokens=24, eos_token_id=None, pad_token_id=0
    )
    for text in ["The capital of France is", "1, 2, 3, 1, 2, 3, 1, 2,"]:
        (first,) = llm.generate(text, greedy, use_tqdm=False)
        continuation = first.outputs[0].token_ids
        # Up to the token before the continuation's first repeat: greedy would then pick a prompt token.
        repeat = next(i for i, token in enumerate(continuation) if token in continuation[:i])
        prompt = {"prompt_token_ids": first.prompt_token_ids + continuation[:repeat]}
        (plain,) = llm.generate(prompt, greedy, use_tqdm=False)
        assert plain.outputs[0].token_ids[0] in prompt["prompt_token_ids"]
        (penalized,) = llm.generate(prompt, penalizing, use_tqdm=False)
        input_ids = torch.tensor([prompt["prompt_token_ids"]])
        expected = model.generate(input_ids, generation_config=config)[0, input_ids.shape[1] :].tolist()
        assert penalized.outputs[0].token_ids == expected
        assert plain.outputs[0].token_ids != expected
