"""Whole-model merging: several saved models in, one out, streamed block by block.

Methods (the math of one tensor; `merge_tensor`):
  linear            sum_i w_i theta_i (weights divided by their sum unless normalize is off): the
                    uniform soup when no weights are given ("Model soups", Wortsman et al. 2022)
  greedy_soup       linear over the members `greedy_soup` picks (decided by the stage, by held-out loss)
  task_arithmetic   base + scale * sum_i w_i (theta_i - base)            (Ilharco et al. 2023)
  ties              trim each task vector to its top `density` share by magnitude, elect a sign per
                    entry by summed delta, average the entries that agree   (Yadav et al. 2023)
  dare_linear/_ties drop each delta entry with probability 1 - density, rescale by 1/density, then
                    add (linear) or elect and average (ties)                 (Yu et al. 2024)
  breadcrumbs(_ties) per tensor, drop the `gamma` share of largest |delta| (outliers) and keep the next
                    `density` share (the tiny rest is dropped too)          (Davari & Belilovsky 2024)
  slerp             spherical interpolation between two models, per tensor; lerp when the two are
                    nearly colinear
The task-vector math is peft.utils.merge_utils' (task_arithmetic, dare_linear, dare_ties, prune,
calculate_majority_sign_mask, disjoint_merge); what is ours is the whole-model part: magnitude trims
from per-tensor thresholds (so a tensor can be processed in blocks), seeded DARE masks, breadcrumbs,
slerp, and the streaming.

Memory: a tensor is read in row blocks of at most BLOCK_ELEMENTS entries per input, each a pread() at
the offset the safetensors header gives (WeightFiles; safe_open memory-maps the file, and the pages a
read touches stay resident while it is open, so RSS would grow to the sum of the inputs). The output is
written block by block too (StreamWriter), never held whole. Thresholds that need a whole tensor (ties,
breadcrumbs) take one input's |delta| at a time, in one reused buffer of the largest tensor's size. So
a merge adds a few blocks per input plus, for those methods, one tensor: under one model for 8 inputs
of a 20M-parameter model (benchmarks/bench_merge_memory.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Callable

from tunelab.errors import ModelError
from tunelab.ops.merge_inputs import check_tensors
from tunelab.ops.safetensors_io import (FLOAT_DTYPES, StreamWriter, WeightFiles, _torch_dtype, peak_rss_bytes,
                                        reset_peak_rss, rss_bytes)

BLOCK_ELEMENTS = 1 << 16  # entries per input per block (256 KiB in fp32); results never depend on it but DARE's masks
DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")

# ---------------------------------------------------------------- the math of one tensor


def effective_weights(method: str, n: int, weights: list[float] | None, options: dict) -> list[float]:
    """The weight each input's tensor (or task vector) is multiplied by."""
    if method == "slerp":
        t = options.get("t", 0.5)
        return [1 - t, t]
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if options.get("normalize", method in ("linear", "greedy_soup")) or method == "greedy_soup":
        total = sum(w)
        w = [x / total for x in w]
    return w


def dare_seed(seed: int, name: str, block: int = 0) -> int:
    """The seed of DARE's drop masks for one block of one tensor: the same whatever order tensors come in."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def magnitude_bounds(delta, density: float, gamma: float = 0.0) -> tuple[float, float]:
    """(lo, hi) such that lo <= |delta| < hi keeps the top `density` share of entries by magnitude after
    dropping the top `gamma` share (ties: gamma = 0; breadcrumbs: gamma > 0). Counts as in peft's
    magnitude pruning: k = int(share * numel). Entries equal to a bound are all kept (lo) or dropped (hi)."""
    import torch

    return bounds_of_magnitudes(delta.detach().reshape(-1).abs().to(torch.float32).numpy().copy(), density, gamma)


def bounds_of_magnitudes(magnitudes, density: float, gamma: float = 0.0) -> tuple[float, float]:
    """magnitude_bounds from a flat float32 numpy array of |delta|, which it reorders in place (np.partition:
    no copy, no index array, so the whole-tensor step costs one tensor of memory)."""
    n = magnitudes.size
    top, keep = int(gamma * n), int(density * n)
    keep = min(keep, n - top)
    hi = lo = math.inf
    if top:
        magnitudes.partition(n - top)
        hi = float(magnitudes[n - top])  # the smallest of the dropped top share
    if keep:
        magnitudes.partition(n - top - keep)
        lo = float(magnitudes[n - top - keep])  # the smallest kept
    return lo, hi


def _mask(delta, bounds: tuple[float, float]):
    lo, hi = bounds
    magnitude = delta.abs()
    keep = magnitude >= lo
    if hi != math.inf:
        keep &= magnitude < hi
    return delta * keep


def _sign_merge(stacked, weights, majority_sign: str):
    """peft's TIES ending: elect a sign per entry, average the agreeing weighted entries."""
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, reshape_weight_task_tensors

    sign_mask = calculate_majority_sign_mask(stacked, method=majority_sign)
    w = reshape_weight_task_tensors(stacked, torch.tensor(weights, dtype=stacked.dtype))
    return disjoint_merge(stacked * w, sign_mask)


def merge_block(method: str, options: dict, tensors: list, weights: list[float], base=None,
                bounds: list[tuple[float, float]] | None = None, seed: int | None = None, coefficients=None):
    """The merged values of one block (rows of a tensor) given the inputs' blocks (float32).

    `bounds`: each input's magnitude_bounds over its whole task vector (ties, breadcrumbs); `seed`: the
    block's dare_seed; `coefficients`: slerp's (c0, c1) from slerp_coefficients over the whole tensor.
    """
    import torch
    from peft.utils import merge_utils as mu

    w = torch.tensor(weights, dtype=torch.float32)
    if method in ("linear", "greedy_soup"):
        return mu.task_arithmetic(tensors, w)
    if method == "slerp":
        c0, c1 = coefficients
        return tensors[0] * c0 + tensors[1] * c1
    deltas = [t - base for t in tensors]
    density = options.get("density", 1.0)
    if method == "task_arithmetic":
        merged = mu.task_arithmetic(deltas, w)
    elif method in ("dare_linear", "dare_ties"):
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
            torch.manual_seed(seed)
            if method == "dare_linear":
                merged = mu.dare_linear(deltas, w, density)
            else:
                merged = mu.dare_ties(deltas, w, density, majority_sign_method=options.get("majority_sign", "total"))
    else:  # ties, breadcrumbs, breadcrumbs_ties: magnitude masks from whole-tensor bounds
        trimmed = [_mask(d, b) for d, b in zip(deltas, bounds)]
        if method == "breadcrumbs":
            merged = mu.task_arithmetic(trimmed, w)
        else:
            merged = _sign_merge(torch.stack(trimmed), weights, options.get("majority_sign", "total"))
    return base + options.get("scale", 1.0) * merged


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float, epsilon: float) -> tuple[float, float]:
    """(c0, c1) with slerp(a, b) = c0 a + c1 b; the lerp's (1 - t, t) when a or b is 0 or they are
    nearly colinear (|cos| > 1 - epsilon), where the spherical formula divides by ~0."""
    if norm_a == 0 or norm_b == 0:
        return 1 - t, t
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > 1 - epsilon:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def merge_tensor(method: str, tensors: list, weights: list[float] | None = None, base=None,
                 options: dict | None = None, name: str = ""):
    """Merge one whole tensor (float32 math, result in the first input's dtype): what the streaming merge
    computes, block by block, for every tensor of the models. `weights` are the recipe's (None: 1 each);
    `options` as in the recipe (density, gamma, scale, normalize, seed, majority_sign, t, epsilon)."""
    import torch

    options = dict(options or {})
    if method in DELTA_METHODS and base is None:
        raise ModelError(f"method {method} needs a base")
    w = effective_weights(method, len(tensors), weights, options)
    ts = [t.to(torch.float32) for t in tensors]
    b = base.to(torch.float32) if base is not None else None
    extra: dict = {}
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        gamma = (options.get("gamma") or 0.0) if method.startswith("breadcrumbs") else 0.0
        extra["bounds"] = [magnitude_bounds(t - b, options.get("density", 1.0), gamma) for t in ts]
    if method in ("dare_linear", "dare_ties"):
        extra["seed"] = dare_seed(options.get("seed", 0), name, 0)
    if method == "slerp":
        a, c = ts[0].double(), ts[1].double()
        extra["coefficients"] = slerp_coefficients(float((a * c).sum()), float(a.norm()), float(c.norm()),
                                                   options.get("t", 0.5), options.get("epsilon", 1e-4))
    return merge_block(method, options, ts, w, base=b, **extra).to(tensors[0].dtype)


def greedy_soup(individual: list[float], score: Callable[[list[int]], float], names: list[str] | None = None,
                log=print) -> tuple[list[int], list[dict]]:
    """The greedy soup's decision (Wortsman et al. 2022): inputs in order of their own held-out loss
    (`individual`, lower is better); the soup starts with the best and takes each next one only if the
    soup with it scores strictly lower (`score(members)` -> loss of their uniform mean).
    Returns (members, decisions)."""
    order = sorted(range(len(individual)), key=lambda i: (individual[i], i))
    members, best = [order[0]], individual[order[0]]
    decisions = [{"model": order[0], "score": best, "kept": True, "why": "best on its own"}]
    for i in order[1:]:
        trial = score(members + [i])
        kept = trial < best
        decisions.append({"model": i, "score": trial, "kept": kept,
                          "why": f"soup {'improves' if kept else 'does not improve'}: {trial:.4f} vs {best:.4f}"})
        log(f"greedy soup: adding {names[i] if names else f'input {i}'}: {trial:.4f} vs {best:.4f} -> "
            f"{'kept' if kept else 'left out'}")
        if kept:
            members, best = members + [i], trial
    return members, decisions


# ---------------------------------------------------------------- the whole-model merge


def _rows(shape: list[int]) -> tuple[int, int]:
    """(rows, rows per block) of a tensor read along its first dimension."""
    if not shape:
        return 1, 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return shape[0], max(1, BLOCK_ELEMENTS // max(1, per_row))


def _blocks(shape: list[int]):
    rows, step = _rows(shape)
    if not shape:
        yield 0, None, None
        return
    for i, start in enumerate(range(0, rows, step)):
        yield i, start, min(rows, start + step)


def merge_files(inputs: list[WeightFiles], out_file: Path, method: str, options: dict,
                weights: list[float] | None = None, base: WeightFiles | None = None) -> dict:
    """Merge the models' weight files into `out_file` (one safetensors file), block by block. The key set
    is the inputs' own (a tied embedding stays stored once), each tensor in the first input's dtype.
    Non-float tensors (integer buffers) must be equal everywhere and are copied. Returns a summary."""
    import torch

    if method in DELTA_METHODS and base is None:
        raise ModelError(f"method {method} needs a base model")
    everyone = inputs + ([base] if base is not None else [])
    keys = check_tensors(everyone)
    w = effective_weights(method, len(inputs), weights, options)
    ref = inputs[0]
    writer = StreamWriter(out_file, [(k, ref.dtype(k), ref.shape(k)) for k in keys], {**ref.metadata, "format": "pt"})
    scratch = None
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        import numpy as np

        scratch = np.empty(max((math.prod(ref.shape(k)) for k in keys if ref.dtype(k) in FLOAT_DTYPES), default=0),
                           dtype=np.float32)
    try:
        for key, _, _ in writer.order:
            out_dtype = _torch_dtype(ref.dtype(key))
            if ref.dtype(key) not in FLOAT_DTYPES:
                for _, start, stop in _blocks(ref.shape(key)):
                    first = ref.read(key, start, stop)
                    for other in everyone[1:]:
                        if not torch.equal(other.read(key, start, stop), first):
                            raise ModelError(f"models differ in non-float tensor {key} ({other.label}); it cannot "
                                             "be merged")
                    writer.write(first)
                continue
            extra = _tensor_stats(method, options, key, inputs, base, scratch)
            for i, start, stop in _blocks(ref.shape(key)):
                blocks = [src.read(key, start, stop).to(torch.float32) for src in inputs]
                base_block = base.read(key, start, stop).to(torch.float32) if base is not None else None
                seed = dare_seed(options.get("seed", 0), key, i) if method in ("dare_linear", "dare_ties") else None
                merged = merge_block(method, options, blocks, w, base=base_block, seed=seed, **extra)
                del blocks, base_block
                writer.write(merged.to(out_dtype))
                del merged
    finally:
        writer.close()
    return {"tensors": len(keys), "bytes": writer.total, "weights": w}


def _tensor_stats(method: str, options: dict, key: str, inputs: list[WeightFiles], base: WeightFiles | None,
                  scratch=None) -> dict:
    """What a method needs from a whole tensor before its blocks: magnitude bounds (one input at a time)
    or slerp's coefficients (dot product and norms, block by block)."""
    import torch

    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        import numpy as np

        gamma = (options.get("gamma") or 0.0) if method.startswith("breadcrumbs") else 0.0
        shape = inputs[0].shape(key)
        # |delta| of one input at a time, whole: in `scratch` (one buffer for the whole merge), else a new array
        magnitudes = np.empty(math.prod(shape), dtype=np.float32) if scratch is None else scratch[:math.prod(shape)]
        flat = torch.from_numpy(magnitudes)
        bounds = []
        for src in inputs:
            pos = 0
            for _, start, stop in _blocks(shape):
                delta = src.read(key, start, stop).to(torch.float32) - base.read(key, start, stop).to(torch.float32)
                flat[pos:pos + delta.numel()] = delta.reshape(-1).abs_()
                pos += delta.numel()
            bounds.append(bounds_of_magnitudes(magnitudes, options.get("density", 1.0), gamma))
        return {"bounds": bounds}
    if method == "slerp":
        dot = norm_a = norm_b = 0.0
        for _, start, stop in _blocks(inputs[0].shape(key)):
            a = inputs[0].read(key, start, stop).to(torch.float64)
            b = inputs[1].read(key, start, stop).to(torch.float64)
            dot, norm_a, norm_b = dot + float((a * b).sum()), norm_a + float((a * a).sum()), norm_b + float((b * b).sum())
        return {"coefficients": slerp_coefficients(dot, math.sqrt(norm_a), math.sqrt(norm_b), options.get("t", 0.5),
                                                   options.get("epsilon", 1e-4))}
    return {}


def measured_merge(inputs: list[WeightFiles], out_file: Path, method: str, options: dict,
                   weights: list[float] | None = None, base: WeightFiles | None = None) -> dict:
    """merge_files with its memory measured: peak RSS during the merge, the RSS before it, the size of one
    model and of all inputs."""
    import time

    from peft.utils import merge_utils

    del merge_utils  # imported first: it loads transformers, memory of the interpreter, not of the merge

    before = rss_bytes()
    isolated = reset_peak_rss()
    start = time.perf_counter()
    summary = merge_files(inputs, out_file, method, options, weights=weights, base=base)
    peak = peak_rss_bytes()
    everyone = inputs + ([base] if base is not None else [])
    return {**summary, "seconds": round(time.perf_counter() - start, 3),
            "memory": {"peak_rss_bytes": peak, "rss_before_bytes": before, "added_bytes": max(0, peak - before),
                       "peak_is_of_the_merge_only": isolated, "model_bytes": inputs[0].nbytes(),
                       "inputs_bytes": sum(s.nbytes() for s in everyone)}}
