"""The compute dtype: a name from the config (`auto` or an explicit dtype) resolved for a device."""

from __future__ import annotations

import torch

from tokenmill.kernels.build import cpu_flags

DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float": torch.float32,  # vLLM's aliases
    "half": torch.float16,
}

# x86: AVX512-BF16 or AMX-BF16 compute bf16 natively; aarch64: the BF16 extension (e.g. Graviton 3).
# Without them torch emulates bf16 matmuls, which is slower than float32.
_NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & _NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(
    name: str | torch.dtype, device: torch.device | str, quantization: str | None = None
) -> torch.dtype:
    """The torch dtype for `name` (auto | float32 | bfloat16 | float16 | float | half, or a torch dtype)
    on `device`.

    auto: bfloat16 on GPUs that support it (float16 on older ones) and on CPUs with native bf16,
    else float32; but float32 for a model quantized on CPU (`quantization` int8 or gguf), whose kernels
    take and return float32 (in bfloat16 every layer converts around them: the embedded model decoded
    one stream 3x slower on an AVX512-BF16 CPU).
    """
    if isinstance(name, torch.dtype) and name in DTYPES_BY_NAME.values():  # LLM(dtype=torch.bfloat16)
        return name
    if name in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[name]
    if name != "auto":
        choices = ", ".join(["auto", *DTYPES_BY_NAME])
        raise ValueError(f"unknown dtype {name!r}: choose one of {choices}")
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() and quantization is None else torch.float32
    return torch.float32


def resolve_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, device: torch.device | str, quantization: str | None
) -> torch.dtype:
    """The KV cache's dtype for `name` (auto | float32 | bfloat16 | float16).

    auto: the model's dtype (as vLLM), except float16 on CPU for a quantized float32 model (int8, gguf):
    its numbers are approximate already, and decode attention at large batches is bound by the bytes it
    reads per cached token, which float16 halves (llama.cpp keeps its cache in float16 too). On CPU a
    float32 or bfloat16 model may also keep a half cache (float16 or bfloat16): the C kernels read and
    write all three and attend in float32. Elsewhere a dtype other than the model's is refused: the GPU
    kernels read the cache in the model's dtype.
    """
    if name != "auto" and name not in DTYPES_BY_NAME:
        choices = ", ".join(["auto", *DTYPES_BY_NAME])
        raise ValueError(f"unknown kv_cache_dtype {name!r}: choose one of {choices}")
    on_cpu = torch.device(device).type == "cpu"
    if name == "auto":
        quantized_float32 = quantization is not None and model_dtype == torch.float32
        return torch.float16 if on_cpu and quantized_float32 else model_dtype
    dtype = DTYPES_BY_NAME[name]
    half_dtypes = (torch.float16, torch.bfloat16)
    cpu_half = on_cpu and model_dtype in (torch.float32, torch.bfloat16) and dtype in half_dtypes
    if dtype != model_dtype and not cpu_half:
        model = str(model_dtype).removeprefix("torch.")
        raise ValueError(
            f"kv_cache_dtype {name} with a {model} model is not supported on {torch.device(device).type}: "
            "the attention kernels read float16 and bfloat16 caches of float32 and bfloat16 models on CPU, "
            "and the model's dtype elsewhere; pass --kv-cache-dtype auto"
        )
    return dtype
