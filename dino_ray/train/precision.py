"""Mixed precision on any device: which dtype a forward runs in, and the autocast context for it.

Weights, optimizer state and the losses stay fp32 everywhere (the losses upcast their inputs); only the
matmul-heavy forward and backward run in bf16 under ``torch.autocast``. On CUDA this is the DINOv2
setting. On CPU it pays only where the processor multiplies bf16 natively (AVX512-BF16, AMX): there a
bf16 matmul runs ~2x faster than fp32, elsewhere it is emulated and slower. ``precision: auto`` therefore
reads the CPU's feature flags (``avx512_bf16``, ``amx_bf16``; ``bf16`` on Arm) and picks bf16 only where
they say the hardware multiplies bf16; where the flags cannot be read (not Linux) it times a bf16 against
an fp32 matmul instead. A flag, unlike a timing on a busy machine, gives the same answer every run, so a
seeded run stays reproducible. fp16 is never chosen on CPU (it has no fast kernels there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path

import torch

# bf16 must beat fp32 by this factor in the timing probe: a tie is not worth the rounding.
MIN_SPEEDUP = 1.2
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # torch.bfloat16 or torch.float32
    reason: str  # said in the log, so a user sees why a run is (not) in bf16

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def _time_matmul(dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(n: int = 512, reps: int = 5) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU with the current threads (~10-50 ms)."""
    return _time_matmul(torch.float32, n, reps) / _time_matmul(torch.bfloat16, n, reps)


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The native-bf16 feature flags of this CPU; ``None`` where /proc/cpuinfo cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split()) & NATIVE_BF16_FLAGS
    return None


def resolve(setting: str, device: torch.device) -> Precision:
    """``auto`` | ``bf16`` | ``fp32`` -> what runs on ``device``, with the reason."""
    if setting not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {setting!r}")
    if setting == "fp32":
        return Precision(torch.float32, "precision: fp32 (as configured)")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, f"precision: bf16 autocast on CUDA ({setting})")
        return Precision(torch.float32, "precision: fp32 (this GPU has no bf16)")
    if device.type != "cpu":
        return Precision(torch.float32, f"precision: fp32 on {device.type}")
    if setting == "bf16":
        return Precision(torch.bfloat16, "precision: bf16 autocast on CPU (as configured)")
    flags = cpu_bf16_flags()
    if flags:
        return Precision(torch.bfloat16, f"precision: auto chose bf16 autocast: this CPU multiplies bf16 "
                                         f"natively ({', '.join(sorted(flags))})")
    if flags is not None:
        return Precision(torch.float32, "precision: auto chose fp32: this CPU has no native bf16 "
                                        "(no avx512_bf16/amx_bf16 flag)")
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"precision: auto chose bf16 autocast: a bf16 matmul ran "
                                         f"{speedup:.2f}x faster than fp32 here")
    return Precision(torch.float32, f"precision: auto chose fp32: a bf16 matmul ran only {speedup:.2f}x "
                                    f"fp32 here")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's context: bf16 autocast, or nothing for fp32."""
    if precision.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)
