"""The offline LLM API end to end on the default model: batching, chunking, caching, sampling options."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from tokenmill import LLM, SamplingParams
from tokenmill.tokenizer import warn_if_vocabulary_outgrows

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LONG_PROMPT = " ".join(f"Item {i} is a small {['red', 'blue', 'green'][i % 3]} box." for i in range(12))
MIXED_PROMPTS = [
    "Hi",
    "The quick brown fox",
    "Explain photosynthesis in one sentence:",
    LONG_PROMPT,
    "1, 2, 3, 4,",
    "Paris is the capital of",
    "In 1492, Columbus",
    "A haiku about autumn:\n",
    "def add(a, b):\n    return",
    "The three primary colors are",
    "Q: What is 2 + 2?\nA:",
    "My favourite food is",
    "Translate to French: cat ->",
    "Once upon a time",
    "The largest planet in the solar system is",
    "SELECT * FROM",
]


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    yield LLM(dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20, max_num_batched_tokens=1024)


def set_token_budget(llm: LLM, budget: int) -> None:
    scheduler = llm.engine.core.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, max_num_batched_tokens=budget)


def test_default_model_completes_a_prompt(llm: LLM) -> None:
    (output,) = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in output.outputs[0].text
    assert output.prompt == "The capital of France is"
    assert output.outputs[0].finish_reason in ("length", "stop")


def assert_batch_and_chunk_invariant(llm: LLM, num_checked: int) -> None:
    """The first `num_checked` of MIXED_PROMPTS decode the same tokens alone as in the batch of 16, and
    LONG_PROMPT the same when its prefill is chunked."""
    short = dataclasses.replace(GREEDY, max_tokens=16)
    checked = MIXED_PROMPTS[:num_checked]
    alone = {p: llm.generate(p, short, use_tqdm=False)[0].outputs[0].token_ids for p in checked}
    set_token_budget(llm, 48)  # LONG_PROMPT (~120 tokens) now prefills in chunks, mixed with decodes
    try:
        batch = llm.generate(MIXED_PROMPTS, short, use_tqdm=False)
        chunked_alone = llm.generate(LONG_PROMPT, short, use_tqdm=False)[0]
    finally:
        set_token_budget(llm, 1024)
    assert len(batch) == 16
    differing = [o.prompt for o in batch[:num_checked] if o.outputs[0].token_ids != alone[o.prompt]]
    assert differing == []
    assert chunked_alone.outputs[0].token_ids == alone[LONG_PROMPT]


def test_greedy_output_is_batch_and_chunk_invariant(llm: LLM) -> None:
    assert_batch_and_chunk_invariant(llm, num_checked=4)


@pytest.mark.parametrize(
    "engine_args",
    [
        # auto on CPUs with native bf16: a step's decode rows once depended on their batch there (padded
        # attention, oneDNN's one-row matrix-vector routine)
        {"dtype": "bfloat16"},
        # a float16 cache: a prompt whose last token came alone in a chunk attended otherwise (the decode
        # kernel, not the prefill one), as did its first chunk (keys and values not rounded to the cache's)
        {"quantization": "gguf"},
    ],
)
def test_greedy_output_is_batch_and_chunk_invariant_on_every_cpu_path(engine_args: dict[str, str]) -> None:
    """All 16 prompts are checked."""
    llm = LLM(max_model_len=1024, kv_cache_memory=64 << 20, max_num_batched_tokens=1024, **engine_args)
    assert_batch_and_chunk_invariant(llm, num_checked=16)


def test_prefix_cache_reuses_blocks_and_keeps_output(llm: LLM) -> None:
    first = llm.generate(LONG_PROMPT + " Summary:", GREEDY, use_tqdm=False)[0]
    second = llm.generate(LONG_PROMPT + " Summary:", GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= len(second.prompt_token_ids) - 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Tell me a story", seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate("Tell me a story", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(
        ["Other prompt", "Tell me a story", "Yet another"], [others, seeded, others], use_tqdm=False
    )
    assert alone == again == batch[1].outputs[0].token_ids
    different = dataclasses.replace(seeded, seed=99)
    assert llm.generate("Tell me a story", different, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    (output,) = llm.generate("Name a fruit:", params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    assert all(len(c.token_ids) == 12 for c in output.outputs)


def test_stop_string_ends_the_text_before_it(llm: LLM) -> None:
    full = llm.generate("1, 2, 3, 4,", GREEDY, use_tqdm=False)[0].outputs[0].text
    assert " 7" in full
    stopped = llm.generate("1, 2, 3, 4,", dataclasses.replace(GREEDY, stop=[" 7"]), use_tqdm=False)[0]
    completion = stopped.outputs[0]
    assert completion.text == full[: full.index(" 7")]
    assert completion.finish_reason == "stop" and completion.stop_reason == " 7"
    kept = dataclasses.replace(GREEDY, stop=[" 7"], include_stop_str_in_output=True)
    assert llm.generate("1, 2, 3, 4,", kept, use_tqdm=False)[0].outputs[0].text.endswith(" 7")


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    greedy = llm.generate("1, 2, 3, 4,", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = greedy[3]
    params = dataclasses.replace(GREEDY, stop_token_ids=[stop_at])
    completion = llm.generate("1, 2, 3, 4,", params, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == greedy[: greedy.index(stop_at) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at
    short = llm.generate("1, 2, 3, 4,", dataclasses.replace(GREEDY, max_tokens=3), use_tqdm=False)[0]
    assert len(short.outputs[0].token_ids) == 3 and short.outputs[0].finish_reason == "length"


def test_eos_ends_generation_unless_ignored(llm: LLM) -> None:
    eos = llm.get_tokenizer().eos_token_id
    chat = [{"role": "user", "content": "Say hello."}]
    finished = llm.chat(chat, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert finished.finish_reason == "stop" and finished.token_ids[-1] == eos
    assert "<|im_end|>" not in finished.text
    ignored = SamplingParams(temperature=0, max_tokens=len(finished.token_ids) + 5, ignore_eos=True)
    longer = llm.chat(chat, ignored, use_tqdm=False)[0].outputs[0]
    assert longer.finish_reason == "length" and len(longer.token_ids) == len(finished.token_ids) + 5


def test_prompt_logprobs_cover_the_prompt(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    (output,) = llm.generate(LONG_PROMPT, params, use_tqdm=False)
    logprobs = output.prompt_logprobs
    assert logprobs is not None and len(logprobs) == len(output.prompt_token_ids)
    assert logprobs[0] is None
    for position, entry in enumerate(logprobs[1:], start=1):
        assert entry is not None and output.prompt_token_ids[position] in entry
        assert 1 <= len(entry) <= 3


def test_prompt_logprobs_once_for_n_completions(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=4, prompt_logprobs=1)
    (output,) = llm.generate("The capital of France is", params, use_tqdm=False)
    assert len(output.outputs) == 3
    assert output.prompt_logprobs is not None and len(output.prompt_logprobs) == len(output.prompt_token_ids)


def test_token_id_prompts(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("The capital of France is")
    by_text = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0]
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    by_list = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == by_list.outputs[0].token_ids


def test_max_tokens_past_the_context_end_there(llm: LLM) -> None:
    # As vLLM's offline API: the prompt must leave room for one token; generation stops at the context's end.
    params = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
    (output,) = llm.generate([[1] * 1018], params, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 6 and output.outputs[0].finish_reason == "length"


def test_bad_input_raises_value_error_and_engine_keeps_working(llm: LLM) -> None:
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 1024], GREEDY)  # no room left for a completion
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="empty"):  # the good prompt before it is not left running
        llm.generate(["Hello", []], GREEDY)
    with pytest.raises(TypeError, match="max_num_seqs"):
        LLM(max_num_seq=4)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("prompts", [5, None])
def test_prompts_of_a_wrong_type_raise_value_error(llm: LLM, prompts: object) -> None:
    with pytest.raises(ValueError, match="^prompts must be"):
        llm.generate(prompts, GREEDY)  # type: ignore[arg-type]


def test_sampling_params_as_a_dict_raise_value_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="^sampling_params must be a SamplingParams"):
        llm.generate("a", {"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^sampling_params must be a SamplingParams"):
        llm.generate(["a", "b"], [GREEDY, {"max_tokens": 3}])  # type: ignore[list-item]


def test_chat_message_without_a_role_raises_value_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="'role'"):
        llm.chat([{"content": "hi"}], GREEDY)


def test_best_of_equal_to_n_generates_n_completions(llm: LLM) -> None:
    params = SamplingParams(n=2, best_of=2, temperature=1.0, seed=5, max_tokens=3, ignore_eos=True)
    (output,) = llm.generate("Name a fruit:", params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1]


def test_preemption_under_a_tiny_kv_cache_keeps_outputs(tiny_model_dir: Callable[[str], Path]) -> None:
    model = str(tiny_model_dir("qwen3"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    prompts = MIXED_PROMPTS[:8]
    roomy = LLM(model, dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    # 8 requests x (~10 prompt + 40 output) tokens need ~32 blocks of 16; give them 16.
    block_bytes = roomy.engine.core.runner.kv_bytes_per_block()
    tight = LLM(model, dtype="float32", max_model_len=256, kv_cache_memory=16 * block_bytes)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    # A resumed request recomputes its prompt; its prompt logprobs are still one per prompt token.
    for mine, reference in zip(got, expected, strict=True):
        assert mine.prompt_logprobs is not None and len(mine.prompt_logprobs) == len(mine.prompt_token_ids)
        assert [sorted(e) if e else e for e in mine.prompt_logprobs] == [
            sorted(e) if e else e for e in reference.prompt_logprobs or []
        ]
    stats = tight.engine.core.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_the_engine_seed_makes_unseeded_sampling_reproducible(tiny_model_dir: Callable[[str], Path]) -> None:
    model = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)  # no per-request seed
    prompts = MIXED_PROMPTS[:3]

    def sampled(seed: int | None) -> list[list[int]]:
        llm = LLM(model, dtype="float32", max_model_len=256, kv_cache_memory=16 << 20, seed=seed)
        torch.seed()  # a fresh random state of torch's global generator, which must not matter
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    first = sampled(1)
    assert sampled(1) == first
    assert sampled(2) != first
    assert sampled(None) != sampled(None)  # unseeded, as vLLM's seed=None: a random default generator


def test_default_sampling_params_take_max_new_tokens_from_generation_config(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    generation_config = {"eos_token_id": 7, "max_new_tokens": 5, "temperature": 0.5}
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    llm = LLM(str(model_dir), max_model_len=256, kv_cache_memory=16 << 20)
    defaults = llm.get_default_sampling_params()
    assert defaults.max_tokens == 5 and defaults.temperature == 0.5
    eos = llm.get_tokenizer().eos_token_id
    assert llm.engine.generation_defaults.eos_token_ids == {eos, 7}  # the tokenizer's eos is kept


def test_tokenizer_argument_replaces_the_models_own_with_its_chat_template_but_not_its_eos(
    tiny_model_dir: Callable[..., Path], smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    # As vLLM's --tokenizer for a GGUF: the base model's tokenizer files alone (no config, no weights).
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model_dir = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    llm = LLM(
        str(model_dir), tokenizer=str(tmp_path / "tokenizer"), max_model_len=256, kv_cache_memory=16 << 20
    )
    (output,) = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert output.prompt == "<<hi>>"  # the tokenizer's template, not the model directory's
    assert 7 in llm.engine.generation_defaults.eos_token_ids  # the model's generation config still holds


def test_a_tokenizer_larger_than_the_models_vocabulary_is_logged(
    smollm2_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    warn_if_vocabulary_outgrows(smollm2_tokenizer, len(smollm2_tokenizer))
    assert "vocabulary" not in caplog.text
    warn_if_vocabulary_outgrows(smollm2_tokenizer, 1000)
    assert "the tokenizer has 49152 tokens but the model's vocabulary only 1000" in caplog.text


def test_max_model_len_beyond_the_model_serves_its_limit(
    tiny_model_dir: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    # As the vLLM image's `--max-model-len 32768` with a model of shorter context (tiny models: 2048).
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=32768, kv_cache_memory=64 << 20)
    assert llm.engine.core.max_model_len == 2048
    assert "longer than the model's limit of 2048 tokens" in caplog.text


def test_a_sliding_window_model_serves_at_most_its_window(
    tiny_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    # tokenmill attends to every cached token: beyond the window a sliding-window model would differ.
    llm = LLM(str(tiny_model_dir("mistral", sliding_window=8)), kv_cache_memory=16 << 20)
    assert llm.engine.core.max_model_len == 8
    assert "sliding-window attention (window 8 tokens)" in caplog.text
    with pytest.raises(ValueError, match="maximum context length is 8 tokens"):
        llm.generate([[1] * 12], GREEDY)
    (output,) = llm.generate([[1] * 4], GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4  # up to the window's end


def test_a_qwen2_window_off_by_use_sliding_window_does_not_cap(tiny_model_dir: Callable[..., Path]) -> None:
    model = tiny_model_dir("qwen2", sliding_window=8, use_sliding_window=False)
    assert LLM(str(model), max_model_len=256, kv_cache_memory=16 << 20).engine.core.max_model_len == 256


def test_too_small_kv_cache_fails_at_start_naming_both_numbers(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match=r"holds \d+ tokens .* max_model_len is 2048"):
        LLM(str(tiny_model_dir("llama")), max_model_len=2048, kv_cache_memory=1 << 16)


# What `tokenmill` depends on beyond the GPU device image's packages (torch, triton, transformers,
# safetensors, tokenizers, numpy, jinja2, tqdm and what transformers needs): the offline engine must not.
NOT_ON_THE_DEVICE_IMAGE = (
    "gguf fastapi starlette uvicorn pydantic openai prometheus_client aiohttp supervisor cryptography psutil"
)
OFFLINE_RUN = """
import sys
for name in sys.argv[2].split():
    sys.modules[name] = None  # importing it raises ImportError
from tokenmill import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=256, kv_cache_memory=16 << 20)
output = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
print(output.outputs[0].token_ids)
"""


def test_offline_llm_runs_a_safetensors_model_without_the_server_or_gguf_packages(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", OFFLINE_RUN, str(tiny_model_dir("qwen3")), NOT_ON_THE_DEVICE_IMAGE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(run.stdout.strip().splitlines()[-1])) == 4
