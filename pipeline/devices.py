"""Where and in which precision torch work runs: one resolver for scoring, training and evaluation.

CUDA when present; on CPUs whose flags include AMX or AVX512-BF16, bf16 is several times faster than
fp32; on AVX2-only CPUs bf16 matmuls are emulated and slower, so fp32 stays the default there.
"""

from __future__ import annotations

import contextlib
from typing import Optional

_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """Flags of the first CPU in /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    return any(f in cpu_flags() for f in _BF16_FLAGS)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """'auto' -> cuda when available, else cpu; anything else is checked and passed to torch.device.

    Raises:
        RuntimeError: CUDA was asked for and is not available.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    return dev


def inference_dtype(device_type: str, dtype: str = "auto") -> str:
    """Weights dtype for inference ('fp32', 'bf16', 'fp16'): fp16 on CUDA, bf16 on fast-bf16 CPUs, else fp32.

    Args:
        device_type: 'cuda' or 'cpu'.
        dtype: 'auto' or an explicit choice (checked).

    Raises:
        ValueError: fp16 on a CPU.
    """
    if dtype == "auto":
        if device_type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if dtype == "fp16" and device_type != "cuda":
        raise ValueError("dtype fp16 needs a CUDA device; use bf16 or fp32 on CPU (or dtype: auto)")
    return dtype


def autocast_dtype(precision: str, device: "torch.device") -> Optional["torch.dtype"]:  # noqa: F821
    """The autocast dtype of a training precision setting on a device (None = plain fp32)."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on CPU use bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: "torch.device", dtype: Optional["torch.dtype"]) -> contextlib.AbstractContextManager:  # noqa: F821
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
