"""The C int8 linear kernel against a torch emulation of its arithmetic, and how it is built and cached
(in the foreground, or in the background while the engine core imports torch)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tokenmill.engine import core_client
from tokenmill.engine.core_client import runs_on_cpu
from tokenmill.kernels import build, cpu
from tokenmill.model.quantization import quantize_per_channel_int8

requires_kernel = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"int8 CPU kernel: {cpu.unavailable_reason()}"
)


def emulated_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What the kernel computes, in float64: x rounded per row to int8 blocks of 32 features (scale =
    max|x| / 127, round half to even), exact integer block dot products, then both scales and the bias."""
    rows, features = x.shape
    blocks = x.double().reshape(rows, features // 32, 32)
    x_scales = blocks.abs().amax(-1, keepdim=True) / 127
    x_int = torch.round(blocks / torch.where(x_scales > 0, x_scales, 1))
    w_int = weight.double().reshape(weight.shape[0], features // 32, 32)
    block_dots = torch.einsum("mbk,nbk->mnb", x_int, w_int)  # exact: integers below 2^53
    out = (block_dots * x_scales.squeeze(-1)[:, None, :]).sum(-1) * scales.double()
    return out if bias is None else out + bias.double()


def random_layer(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    return weight, bias


@requires_kernel
@pytest.mark.parametrize("num_rows", [1, 3, 4, 9, 64, 300])  # 300: two passes of 256 rows
@pytest.mark.parametrize("out_features", [96, 97])  # odd: the last column goes alone
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_its_emulation(num_rows: int, out_features: int, with_bias: bool) -> None:
    library = cpu.kernel_library()
    assert library is not None
    weight, bias = random_layer(out_features, 256)
    q, scales = quantize_per_channel_int8(weight)
    x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(1))
    x[0, :32] = 0  # an all-zero block has scale 0
    x[-1, 40] = 50.0  # an outlier channel only coarsens its own block
    used_bias = bias if with_bias else None
    ours = cpu.int8_linear(library, x, q, scales, used_bias)
    expected = emulated_int8_linear(x, q, scales, used_bias).float()
    # The float sums run in another order (8 lanes, then fused multiply-adds): float32 rounding only.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # And close to the float layer: per-channel weight rounding plus per-block activation rounding.
    reference = F.linear(x, weight, used_bias)
    assert (ours - reference).norm() / reference.norm() < 0.02


@requires_kernel
def test_a_rows_output_does_not_depend_on_the_batch() -> None:
    """Rows go through the kernel four at a time or alone; both sum in the same order, bit for bit."""
    library = cpu.kernel_library()
    assert library is not None
    q, scales = quantize_per_channel_int8(random_layer(130, 192)[0])
    x = torch.randn(263, 192, generator=torch.Generator().manual_seed(2))  # 256 rows per pass, then 7
    batched = cpu.int8_linear(library, x, q, scales, None)
    for row in [*range(8), *range(250, 263)]:
        alone = cpu.int8_linear(library, x[row : row + 1], q, scales, None)
        assert torch.equal(alone[0], batched[row])


@requires_kernel
def test_the_library_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    compiler = cpu.find_compiler()
    assert compiler is not None
    library = cpu.build(cpu.SOURCE, compiler)
    assert library.parent == tmp_path / "kernels" and library.suffix == ".so"
    built_at = library.stat().st_mtime_ns
    assert cpu.build(cpu.SOURCE, compiler) == library and library.stat().st_mtime_ns == built_at
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no scratch left behind


def test_a_failed_build_leaves_no_file_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    compiler = cpu.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    with pytest.raises(RuntimeError, match="failed"):
        cpu.build(broken, compiler)
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []

    monkeypatch.setattr(cpu, "SOURCE", broken)
    cpu.kernel_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu.__name__):
            assert cpu.kernel_library() is None
    finally:
        cpu.kernel_library.cache_clear()
    assert "building broken.c failed" in caplog.text and "using the torch path instead" in caplog.text


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    assert cpu.unavailable_reason() == f"{cpu.DISABLE_ENV}=0"


def test_a_missing_compiler_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    if not {"avx2", "fma"} <= cpu.cpu_flags():
        pytest.skip("the CPU check comes first on this machine")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu.unavailable_reason() == "no C compiler found: install gcc (or set CC)"


@requires_kernel
def test_a_changed_header_rebuilds_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's cache key covers the headers beside its source (simd.h), not only the source."""
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("int8_linear.c", "simd.h"):
        (sources / name).write_text((cpu.SOURCE_DIR / name).read_text())
    compiler = cpu.find_compiler()
    assert compiler is not None
    first = cpu.build(sources / "int8_linear.c", compiler)
    (sources / "simd.h").write_text((sources / "simd.h").read_text() + "\n/* changed */\n")
    assert cpu.build(sources / "int8_linear.c", compiler) != first


@requires_kernel
def test_a_build_under_way_in_the_background_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine core starts the build before importing torch; the load that follows finds it under way
    and waits for it instead of compiling a second time."""
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    compiles: list[list[str]] = []
    run = subprocess.run

    def counted_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        compiles.append(command)
        return run(command, **kwargs)

    monkeypatch.setattr(build.subprocess, "run", counted_run)
    thread = build.build_in_background(cpu.SOURCE)
    assert thread is not None
    library = cpu.build(cpu.SOURCE, build.find_compiler() or "cc")  # while the thread compiles
    thread.join()
    assert library.exists() and len(compiles) == 1
    assert [p.name for p in library.parent.iterdir()] == [library.name]


def test_no_background_build_where_the_kernels_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    assert build.build_in_background() is None


def test_the_core_builds_cpu_kernels_only_where_it_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runs_on_cpu("cpu") and not runs_on_cpu("cuda") and not runs_on_cpu("cuda:1")
    monkeypatch.setattr(core_client.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert not runs_on_cpu("auto")  # NVIDIA's driver: auto will take CUDA
    monkeypatch.setattr(core_client.os.path, "exists", lambda path: False)
    assert runs_on_cpu("auto")
