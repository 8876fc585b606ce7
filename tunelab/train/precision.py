"""`train.precision: auto`: bf16 where the device computes it fast, fp32 elsewhere.

bf16 autocast is a speed-up only with hardware support. On a CPU without AMX or AVX512-BF16
(an AVX2-only AMD EPYC, measured) a bf16 matmul ran at 0.3 GFLOP/s against 156 GFLOP/s in
fp32: training became ~40x slower. So `auto` decides from the device's capability and confirms
it with a short timed probe; an explicit `bf16` on such a CPU trains as asked but warns once
with the measured slowdown.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

PROBE_SIZE = 256


def cpu_has_fast_bf16() -> bool:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


@lru_cache(maxsize=None)
def bf16_slowdown(device_type: str) -> float:
    """Time of a bf16 matmul over an fp32 one on this device (best of a few, after a warm-up)."""
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device_type)

    def best(dtype) -> float:
        x = a.to(dtype)
        times = []
        for _ in range(4):
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(4):
                x @ x
            if device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def resolve_precision(requested: str, device: torch.device, log=print) -> tuple[str, str]:
    """(precision to use, why). `requested` is the recipe's fp32 | bf16 | auto."""
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        reason = f"CUDA {'with' if fast else 'without'} bf16 support"
    else:
        capable = cpu_has_fast_bf16()
        # The flags say what the CPU has; the probe confirms it (a VM may hide or emulate it).
        slowdown = bf16_slowdown("cpu") if capable or requested == "bf16" else float("inf")
        fast = capable and slowdown < 1.5
        reason = (f"CPU {'with' if capable else 'without'} AMX/AVX512-BF16"
                  + (f", bf16 matmul {slowdown:.1f}x the time of fp32" if slowdown != float("inf") else ""))
    if requested == "auto":
        return ("bf16" if fast else "fp32"), f"auto: {reason}"
    if requested == "bf16" and not fast:
        log(f"warning: train.precision=bf16 on a {reason}: training will be much slower than fp32; "
            "use train.precision=auto or fp32")
    return requested, reason


def autocast_dtype(precision: str):
    return torch.bfloat16 if precision == "bf16" else None
