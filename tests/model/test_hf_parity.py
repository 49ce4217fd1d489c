"""Greedy tokens and top-5 logprobs against Hugging Face transformers, float32, same weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

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
