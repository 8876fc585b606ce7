"""`train.precision: auto`: bf16 where the hardware computes it natively, fp32 elsewhere.

bf16 autocast is a speed-up only with hardware support. On a CPU without AMX or AVX512-BF16
(an AVX2-only AMD EPYC, measured) a bf16 matmul ran at 0.3 GFLOP/s against 156 GFLOP/s in
fp32: training became ~40x slower. So `auto` decides from what the hardware reports (the CPU's
flags, the GPU's compute capability), never from a timing: a timed probe flipped between fp32
and bf16 on one machine as its load changed, and the same recipe must train the same way on
the same machine. An explicit `bf16` on hardware without it trains as asked, with a warning.
"""

from __future__ import annotations

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hardware_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether the device computes bf16 natively, the facts that say so)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor} (native bf16 from 8.0)"
    found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    kind = f"CPU {torch.backends.cpu.get_cpu_capability()}"
    return bool(found), f"{kind} with {'/'.join(found)}" if found else f"{kind} without AMX/AVX512-BF16"


def resolve_precision(requested: str, device: torch.device, log=print) -> tuple[str, str]:
    """(precision to use, why). `requested` is the recipe's fp32 | bf16 | auto."""
    if requested == "fp32":
        return "fp32", "set in the recipe"
    native, facts = hardware_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"auto: {facts}"
    if not native:
        log(f"warning: train.precision=bf16 on a {facts}: training will be much slower than fp32; "
            "use train.precision=auto or fp32")
    return "bf16", f"set in the recipe; {facts}"


def autocast_dtype(precision: str):
    return torch.bfloat16 if precision == "bf16" else None
