"""train.release_freed_memory: host memory goes back to the operating system as soon as it is freed.

glibc's malloc serves a block of up to 32 MiB from its heap once a process has freed a big one (its mmap
threshold rises by itself), and keeps what is freed there for reuse. A CPU training step allocates and frees
gigabytes of activations, gradients and logits in blocks of a few MiB, and the heap fragments: at 200M
parameters the resident memory at the peak of a LoRA step was ~1.1 GB above the ~0.3 GB it held live
(benchmarks/RESULTS.md). Fixing the threshold at 1 MiB (which also turns its rise off) gives every block of
1 MiB or more its own mapping, returned when freed, so resident memory follows the live tensors; the cost is
a page fault per fresh page: 12-30% of the tokens/s on CPU at 200M (full fine-tuning 0.88x, LoRA with
checkpointing and chunks 0.71x). It changes no number of the run.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
OWN_MAPPING_BYTES = 1 << 20


def release_freed_memory() -> bool:
    """From now on, blocks of >= 1 MiB get their own mapping, returned to the OS when freed. False where the C
    library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_BYTES) == 1
