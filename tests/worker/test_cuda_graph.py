"""CUDA graphs of the decode step, checked on CPU: the buckets, and replays of padded batches.

Without a GPU, `FakeGraph` stands in for `torch.cuda.CUDAGraph`: capturing records the model call, and a
replay runs that call again on the same static tensors into the same output tensor, which is what
replaying a real graph does. So everything `DecodeGraphs` does around the graph (choosing the bucket,
copying a step's inputs into the static buffers, pointing padded rows at the scratch block, slicing the
output) runs as on a GPU, with the Triton backend in triton's interpreter. On CUDA,
tests/attention/test_triton_engine.py and benchmarks/gpu_check.py replay real graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.attention.triton_interpret import interpret_without_cuda

interpret_without_cuda()  # before triton is imported
pytest.importorskip("triton")

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.attention.selector import BACKEND_ENV  # noqa: E402
from tokenmill.worker.cuda_graph import DecodeGraphs, batch_size_buckets  # noqa: E402
from tokenmill.worker.inputs import ModelInputs  # noqa: E402

MAX_NUM_SEQS = 4
PROMPTS = ["The quick brown fox", "Hi", "One two three four five", "Paris is"]
# Different lengths, so decode batches of 4, 3, 2 and 1 sequences: buckets 4, 4 (one padded row), 2, 1.
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 7, 5, 3)]


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3, 8, 16, 17, 100, 256])
def test_buckets_cover_every_batch_size_up_to_max_num_seqs(max_num_seqs: int) -> None:
    buckets = batch_size_buckets(max_num_seqs)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_num_seqs
    for batch in range(1, max_num_seqs + 1):
        bucket = next(b for b in buckets if b >= batch)
        assert bucket - batch < 16, "a batch pads by fewer rows than the bucket step"


class FakeGraph:
    """`torch.cuda.CUDAGraph` on CPU: `replay` re-runs the captured call into the captured output."""

    capturing: FakeGraph | None = None

    def __init__(self) -> None:
        self.call: tuple[torch.Tensor, Callable[[], torch.Tensor]] | None = None
        self.num_replays = 0

    def pool(self) -> None:
        return None

    def replay(self) -> None:
        assert self.call is not None, "replayed before capture"
        output, run = self.call
        output.copy_(run())
        self.num_replays += 1


@contextlib.contextmanager
def fake_capture(graph: FakeGraph, pool: Any = None) -> Iterator[None]:
    FakeGraph.capturing = graph
    try:
        yield
    finally:
        FakeGraph.capturing = None


class CapturedModel:
    """The model as `DecodeGraphs` calls it: a call made while capturing becomes the graph's call."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any) -> torch.Tensor:
        output = self.model(*args)
        graph = FakeGraph.capturing
        if graph is not None:
            graph.call = (output, lambda: self.model(*args))
        return output


def generate(model: Path, monkeypatch: pytest.MonkeyPatch, graphs: bool, async_scheduling: bool) -> Any:
    monkeypatch.setenv(BACKEND_ENV, "triton")
    llm = LLM(
        str(model),
        dtype="float32",
        max_model_len=128,
        kv_cache_memory=2 << 20,
        max_num_seqs=MAX_NUM_SEQS,
        async_scheduling=async_scheduling,
    )
    runner = llm.engine.core.runner
    batches: list[tuple[int, int]] = []  # (sequences, bucket) of each replay
    if graphs:
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", fake_capture)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 2 << 30))
        num_blocks = runner.attention_layers[0].kv_cache.shape[1] - 1  # the last block is the scratch one
        decode_graphs = DecodeGraphs(
            CapturedModel(runner.model), MAX_NUM_SEQS, 128, runner.block_size, num_blocks, runner.device
        )
        decode_graphs.capture()
        run = decode_graphs.run

        def recording_run(inputs: ModelInputs) -> torch.Tensor:
            num_seqs = inputs.attn_metadata.num_seqs
            batches.append((num_seqs, next(b for b in decode_graphs.buckets if b >= num_seqs)))
            return run(inputs)

        monkeypatch.setattr(decode_graphs, "run", recording_run)
        runner.decode_graphs = decode_graphs
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], batches


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_replayed_padded_decode_steps_give_the_eager_tokens(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, async_scheduling: bool
) -> None:
    model = tiny_model_dir("qwen3")
    eager, _ = generate(model, monkeypatch, graphs=False, async_scheduling=async_scheduling)
    replayed, batches = generate(model, monkeypatch, graphs=True, async_scheduling=async_scheduling)
    assert replayed == eager
    assert [len(tokens) for tokens in replayed] == [9, 7, 5, 3]
    assert {bucket for _, bucket in batches} == {1, 2, 4}, batches
    assert any(num_seqs < bucket for num_seqs, bucket in batches), "no replay had padded rows"
