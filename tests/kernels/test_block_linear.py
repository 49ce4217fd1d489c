"""The GGUF block kernel (kernels/block_linear.c) against a float64 emulation over gguf's dequantization."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tokenmill.kernels import build, cpu
from tokenmill.model.gguf_linear import KERNEL_FORMATS, pack_rows

requires_kernel = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"CPU kernels: {cpu.unavailable_reason()}"
)
BLOCK_TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


def gguf_weight(
    out_features: int, in_features: int, block_type: GGMLQuantizationType, seed: int = 0
) -> tuple[np.ndarray, torch.Tensor]:
    """A random weight as a GGUF file stores it ([rows, bytes]) and the values gguf reads back from it."""
    values = np.random.default_rng(seed).standard_normal((out_features, in_features)) * 0.05
    rows = quantize(values.astype(np.float32), block_type)
    return rows, torch.from_numpy(dequantize(rows, block_type).astype(np.float32))


def emulated(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in float64: x rounded per row to int8 blocks of 32 features (scale =
    max|x| / 127, round half to even) times the file's weights."""
    rows, features = x.shape
    blocks = x.double().reshape(rows, features // 32, 32)
    x_scales = blocks.abs().amax(-1, keepdim=True) / 127
    x_rounded = torch.round(blocks / torch.where(x_scales > 0, x_scales, 1)) * x_scales
    out = x_rounded.reshape(rows, features) @ weight.double().T
    return out if bias is None else out + bias.double()


@requires_kernel
@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_rows", [1, 3, 4, 9, 300])  # 300: two passes of 256 rows
@pytest.mark.parametrize("out_features", [96, 100])  # 100: a last group of 4 rows, padded with zeros
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_its_emulation(
    block_type: GGMLQuantizationType, num_rows: int, out_features: int, with_bias: bool
) -> None:
    library = cpu.kernel_library()
    assert library is not None
    rows, weight = gguf_weight(out_features, 320, block_type)  # 10 blocks per row
    packed = torch.from_numpy(pack_rows(rows, block_type))
    x = torch.randn(num_rows, 320, generator=torch.Generator().manual_seed(1))
    x[0, :32] = 0  # an all-zero block has scale 0
    x[-1, 40] = 50.0  # an outlier channel only coarsens its own block
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(2)) if with_bias else None
    ours = cpu.block_linear(library, x, packed, KERNEL_FORMATS[block_type], out_features, bias)
    # Integer block sums are exact; the float scaling runs in another order: float32 rounding only.
    torch.testing.assert_close(ours, emulated(x, weight, bias).float(), rtol=1e-5, atol=1e-5)


@requires_kernel
@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_a_rows_output_does_not_depend_on_the_batch(block_type: GGMLQuantizationType) -> None:
    """Rows go through the kernel four at a time or alone; both sum in the same order, bit for bit."""
    library = cpu.kernel_library()
    assert library is not None
    rows, _ = gguf_weight(136, 192, block_type)
    packed, block_format = torch.from_numpy(pack_rows(rows, block_type)), KERNEL_FORMATS[block_type]
    x = torch.randn(263, 192, generator=torch.Generator().manual_seed(2))  # 256 rows per pass, then 7
    batched = cpu.block_linear(library, x, packed, block_format, 136, None)
    for row in [*range(8), *range(250, 263)]:
        alone = cpu.block_linear(library, x[row : row + 1], packed, block_format, 136, None)
        assert torch.equal(alone[0], batched[row])


@pytest.mark.skipif(
    cpu.unavailable_reason() is not None
    or not cpu.cpu_flags() >= build.VNNI_CPU_FLAGS
    or os.environ.get(build.VNNI_ENV) == "0",
    reason="needs the CPU kernels on a CPU with AVX512-VNNI, -VL and -BW, and their use not turned off",
)
@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_the_vnni_build_computes_the_same_numbers(
    block_type: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On such CPUs the library multiplies bytes with vpdpbusd (two groups at a time in 512-bit vectors);
    its integer sums are exact, so every output equals the maddubs build's bit for bit, whatever the row
    count (a row alone, tiles of 4, a 256-row pass) and with an odd number of groups (136 rows: 17)."""
    vnni = cpu.kernel_library()
    assert vnni is not None and "-mavx512vnni" in build.compile_flags()
    monkeypatch.setenv(build.VNNI_ENV, "0")
    maddubs = cpu.load(cpu.SOURCE, cpu.SIGNATURES)
    assert maddubs is not None and "-mavx512vnni" not in build.compile_flags()
    rows, _ = gguf_weight(136, 320, block_type)
    packed, block_format = torch.from_numpy(pack_rows(rows, block_type)), KERNEL_FORMATS[block_type]
    for num_rows in (1, 3, 16, 263):
        x = torch.randn(num_rows, 320, generator=torch.Generator().manual_seed(num_rows))
        bias = torch.randn(136, generator=torch.Generator().manual_seed(3))
        expected = cpu.block_linear(maddubs, x, packed, block_format, 136, bias)
        assert torch.equal(cpu.block_linear(vnni, x, packed, block_format, 136, bias), expected)


@pytest.mark.skipif(
    cpu.unavailable_reason() is not None or "-mamx-int8" not in build.compile_flags(),
    reason="needs the CPU kernels on a CPU with AVX512-VNNI and AMX-INT8, and their use not turned off",
)
@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_the_amx_build_computes_the_same_numbers(
    block_type: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On AMX CPUs calls of 16 rows or more multiply on tiles of 16 rows; their sums are the vector path's
    exact integers and their scaling the same float operations, so every output equals the VNNI build's bit
    for bit: whole tiles, 1 or 15 rows past the last whole tile (left to the vector path), two passes of 256
    rows, 17 groups (a last one without a pair, left to the vector path), a last group padded with zero rows
    (100 outputs), bias."""
    amx = cpu.kernel_library()
    assert amx is not None
    monkeypatch.setenv(build.AMX_ENV, "0")
    vnni = cpu.load(cpu.SOURCE, cpu.SIGNATURES)
    assert vnni is not None and "-mamx-int8" not in build.compile_flags()
    for out_features in (136, 100):
        rows, _ = gguf_weight(out_features, 352, block_type)  # 11 blocks: an odd count
        packed, block_format = torch.from_numpy(pack_rows(rows, block_type)), KERNEL_FORMATS[block_type]
        bias = torch.randn(out_features, generator=torch.Generator().manual_seed(3))
        for num_rows in (15, 16, 17, 31, 263, 512):
            x = torch.randn(num_rows, 352, generator=torch.Generator().manual_seed(num_rows))
            x[1, :32] = 0  # a block of scale 0
            x[-1, 40] = 50.0
            for b in (None, bias):
                expected = cpu.block_linear(vnni, x, packed, block_format, out_features, b)
                assert torch.equal(cpu.block_linear(amx, x, packed, block_format, out_features, b), expected)


@pytest.mark.skipif(
    cpu.unavailable_reason() is not None or "-mamx-int8" not in build.compile_flags(),
    reason="needs the CPU kernels built with AMX-INT8",
)
def test_the_tiles_and_onednns_bfloat16_matmuls_take_turns_on_the_same_threads() -> None:
    """oneDNN runs bfloat16 matmuls on AMX tiles too, with its own tile configuration, on the same OpenMP
    threads: each kernel must configure the tiles it uses, whatever ran before it."""
    library = cpu.kernel_library()
    assert library is not None
    rows, _ = gguf_weight(136, 352, GGMLQuantizationType.Q4_1)
    packed = torch.from_numpy(pack_rows(rows, GGMLQuantizationType.Q4_1))
    x = torch.randn(300, 352, generator=torch.Generator().manual_seed(4))
    a, w = x.to(torch.bfloat16), torch.randn(512, 352, generator=torch.Generator().manual_seed(5)).bfloat16()
    matmul = torch.nn.functional.linear(a, w)
    block = cpu.block_linear(library, x, packed, "Q4_1", 136, None)
    assert torch.equal(torch.nn.functional.linear(a, w), matmul)
    assert torch.equal(cpu.block_linear(library, x, packed, "Q4_1", 136, None), block)


def test_amx_flags_follow_the_cpu_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.VNNI_ENV, raising=False)
    monkeypatch.delenv(build.AMX_ENV, raising=False)
    vnni = {"avx2", "fma", "f16c", "avx512_vnni", "avx512vl", "avx512bw"}
    monkeypatch.setattr(build, "cpu_flags", lambda: vnni | {"amx_tile", "amx_int8"})
    assert build.compile_flags() == build.CFLAGS + build.VNNI_FLAGS + build.AMX_FLAGS
    monkeypatch.setenv(build.AMX_ENV, "0")
    assert build.compile_flags() == build.CFLAGS + build.VNNI_FLAGS
    monkeypatch.delenv(build.AMX_ENV)
    monkeypatch.setenv(build.VNNI_ENV, "0")  # the tiles' code sits in the VNNI build
    assert build.compile_flags() == build.CFLAGS
    monkeypatch.delenv(build.VNNI_ENV)
    monkeypatch.setattr(build, "cpu_flags", lambda: vnni | {"amx_tile"})  # tiles without their int8 products
    assert build.compile_flags() == build.CFLAGS + build.VNNI_FLAGS


def test_vnni_flags_follow_the_cpu_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.VNNI_ENV, raising=False)
    avx2 = {"avx2", "fma", "f16c"}
    monkeypatch.setattr(build, "cpu_flags", lambda: avx2 | {"avx512_vnni", "avx512vl", "avx512bw"})
    assert build.compile_flags() == build.CFLAGS + build.VNNI_FLAGS
    monkeypatch.setenv(build.VNNI_ENV, "0")
    assert build.compile_flags() == build.CFLAGS
    monkeypatch.delenv(build.VNNI_ENV)
    monkeypatch.setattr(build, "cpu_flags", lambda: avx2 | {"avx512_vnni", "avx512bw"})  # no VL
    assert build.compile_flags() == build.CFLAGS


@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_packed_weights_are_the_files_values(block_type: GGMLQuantizationType) -> None:
    """Unpacking the kernel's layout as block_linear.c describes it gives back gguf's values exactly."""
    rows, expected = gguf_weight(20, 96, block_type)  # 20 rows: a last group padded with 4 zero rows
    assert torch.equal(unpacked(pack_rows(rows, block_type), KERNEL_FORMATS[block_type])[:20], expected)


def unpacked(packed: np.ndarray, block_format: str) -> torch.Tensor:
    """The weight [groups * 8, K] that the kernel's packed groups hold (float32, as gguf computes it)."""
    num_groups = packed.shape[0]
    if block_format == "Q4_1":
        per_block = packed.reshape(num_groups, -1, 160)
        nibbles = per_block[:, :, :128].reshape(num_groups, -1, 4, 8, 4)  # [group, block, load, row, byte]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2)  # loads 0-3: weights 0-15, then 16-31
        scales = per_block[:, :, 128:144].copy().view(np.float16).astype(np.float32)  # [group, block, row]
        mins = per_block[:, :, 144:160].copy().view(np.float16).astype(np.float32)
    else:
        per_block = packed.reshape(num_groups, -1, 272)
        values = per_block[:, :, :256].copy().view(np.int8).reshape(num_groups, -1, 8, 8, 4)
        scales = per_block[:, :, 256:272].copy().view(np.float16).astype(np.float32)
        mins = np.zeros_like(scales)
    weights = values.astype(np.float32) * scales[:, :, None, :, None] + mins[:, :, None, :, None]
    return torch.from_numpy(weights.transpose(0, 3, 1, 2, 4).reshape(num_groups * 8, -1))
