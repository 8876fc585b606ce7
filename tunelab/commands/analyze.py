"""`tunelab analyze BASE TUNED`: what a fine-tune did to the weights, matrix by matrix.

For every tensor: how many entries changed (and the share left exactly as they were), the update's
Frobenius norm, absolute and relative to the base tensor's; for every matrix also the update's rank
(numerical, and the entropy effective rank of Roy & Vetterli 2007) and the number of intruder
dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Tensors stream one at a time from the two safetensors files (ops/safetensors_io.WeightFiles), so
memory holds a few copies of the largest matrix, never two models. An adapter (or a run whose final/
is one) is merged onto BASE first and saved to a temporary directory, as merges do.

Intruder detection follows peft's `peft.tuners.lora.intruders.reduce_intruder_dimension` (same rule,
same defaults). That function is not reused: it needs a PeftModel with a LoRA adapter and rewrites the
adapter, while this command analyzes any fine-tune (full, BitFit, merged) without changing it.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from tunelab.errors import ModelError

# The paper's main setting (and peft's reduce_intruder_dimension defaults): the tuned matrix's 10
# largest singular directions, an intruder when no base singular vector has |cos| >= 0.5 with it.
DEFAULT_TOP_K = 10
DEFAULT_THRESHOLD = 0.5

# Machine epsilon of the storage dtypes: an update is only known to this relative precision.
DTYPE_EPS = {"F64": 2.0 ** -52, "F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7,
             "F8_E4M3": 2.0 ** -3, "F8_E5M2": 2.0 ** -2}


# ---------------------------------------------------------------- the math, on one tensor (pure)


def effective_rank(singular_values) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the singular values normalised to sum 1.
    Equals r for r equal singular values; 0 for none (an unchanged matrix)."""
    import torch

    s = torch.as_tensor(singular_values, dtype=torch.float64)
    s = s[s > 0]
    if not s.numel():
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def rank_tolerance(tuned, eps: float) -> float:
    """The singular value below which a direction of the update is rounding, not training.

    Storing the tuned matrix rounds each entry by up to eps/2 of its size (a merged LoRA update,
    exactly rank r in float64, is full rank once W + BA is stored). Noise of entry size ~ eps * rms(W)
    has a spectral norm of about eps * rms(W) * (sqrt(m) + sqrt(n)) = eps * ||W||_F * (1/sqrt(m) +
    1/sqrt(n)); this is the tolerance (about 3x that noise's norm)."""
    m, n = tuned.shape
    return eps * float(tuned.double().norm()) * (1 / math.sqrt(m) + 1 / math.sqrt(n))


def numerical_rank(singular_values, tol: float) -> int:
    return int((singular_values > tol).sum())


def intruder_dimensions(base, tuned, top_k: int = DEFAULT_TOP_K,
                        threshold: float = DEFAULT_THRESHOLD) -> tuple[int, list[float]]:
    """(count, max |cos| of each of the top-k) for the tuned matrix's top_k left singular vectors (by
    singular value): an intruder is one whose largest |cosine similarity| with every left singular vector
    of the base is below `threshold`. |cos| because a singular vector's sign is arbitrary. peft's rule."""
    import torch

    u_base = torch.linalg.svd(base.float(), full_matrices=False)[0]
    u_tuned = torch.linalg.svd(tuned.float(), full_matrices=False)[0][:, :top_k]
    max_cos = (u_tuned.T @ u_base).abs().max(dim=1).values
    return int((max_cos < threshold).sum()), [round(float(c), 4) for c in max_cos]


def tensor_stats(base, tuned, dtype: str = "F32", top_k: int = DEFAULT_TOP_K,
                 threshold: float = DEFAULT_THRESHOLD) -> dict:
    """One tensor's update: changed entries, sparsity, norms; for a float matrix also ranks and intruders.
    `dtype` is the tuned tensor's safetensors dtype (its precision sets the rank tolerance)."""
    import torch

    changed = int((tuned != base).sum())
    numel = base.numel()
    row = {"shape": list(base.shape), "dtype": dtype, "params": numel, "changed": changed,
           "unchanged_share": 1 - changed / numel if numel else 1.0,
           "norm": None, "relative_norm": None, "numerical_rank": None, "effective_rank": None,
           "rank_tolerance": None, "intruders": None, "top_k_max_cos": None}
    if not (base.is_floating_point() and tuned.is_floating_point()):
        return row  # integer buffers: changed or not, nothing more to measure
    delta = tuned.double() - base.double()  # exact: the difference of two floats of <= 32 bits fits in 64
    row["norm"] = float(delta.norm())
    base_norm = float(base.double().norm())
    # None (not inf, which JSON cannot hold) when the base tensor is all zeros: relative to nothing.
    row["relative_norm"] = row["norm"] / base_norm if base_norm > 0 else (0.0 if changed == 0 else None)
    if base.dim() != 2 or min(base.shape) == 0:
        return row
    if changed == 0:  # no SVD needed: an unchanged matrix has rank 0 and the same singular vectors
        row.update(numerical_rank=0, effective_rank=0.0, rank_tolerance=0.0, intruders=0)
        return row
    singular = torch.linalg.svdvals(delta)
    tol = max(rank_tolerance(tuned, DTYPE_EPS.get(dtype, 2.0 ** -23)),
              float(singular[0]) * max(delta.shape) * DTYPE_EPS["F64"])  # float64 SVD's own floor
    row["rank_tolerance"] = tol
    row["numerical_rank"] = numerical_rank(singular, tol)
    # Entropy over the directions above the tolerance: rounding noise would add a little of every dimension.
    row["effective_rank"] = effective_rank(singular[singular > tol])
    row["intruders"], row["top_k_max_cos"] = intruder_dimensions(base, tuned, top_k, threshold)
    return row


# ---------------------------------------------------------------- models in, report out


def _trainable(tuned_item, log) -> tuple[int | None, str | None]:
    """What was trained: an adapter's own parameter count, else what the run recorded (its `model` event)."""
    from tunelab.ops.safetensors_io import read_header
    from tunelab.runs import read_metrics

    if tuned_item.adapter:
        file = tuned_item.path / "adapter_model.safetensors"
        if file.is_file():
            header = read_header(file, tuned_item.label)[0]
            header.pop("__metadata__", None)
            return sum(math.prod(info["shape"]) for info in header.values()), "adapter tensors"
    run = tuned_item.path.parent if tuned_item.path.name == "final" else None
    if run is not None and (run / "metrics.jsonl").is_file():
        for event in read_metrics(run / "metrics.jsonl", warn=log):
            if event.get("event") == "model" and event.get("trainable") is not None:
                return int(event["trainable"]), f"{run.name}/metrics.jsonl"
    return None, None


def _merge_adapter(item, base_dir: Path, work: Path, log) -> None:
    """Fold a LoRA adapter into BASE (checked against the base hash the adapter recorded) and save it."""
    from tunelab import models

    log(f"{item.label}: LoRA adapter: merging it onto {base_dir}")
    try:
        model = models.load_adapter(str(item.path), field="TUNED", merge=True, base=str(base_dir))[0]
    except (RuntimeError, ValueError, KeyError) as err:  # peft's own errors for an adapter of other shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"TUNED: {item.path} cannot be applied to BASE {base_dir} ({first[:200]}); give the "
                         "base the adapter was trained on") from None
    item.model_dir = work / "tuned-merged"
    model.save_pretrained(item.model_dir, safe_serialization=True)


def _check_same_architecture(base, tuned, base_files, tuned_files) -> list[str]:
    """Same model_type and architectures, the same tensor names and shapes: the first difference named."""
    from tunelab.ops.safetensors_io import FLOAT_DTYPES

    configs = [json.loads((i.model_dir / "config.json").read_text()) for i in (base, tuned)]
    for key in ("model_type", "architectures"):
        if configs[0].get(key) != configs[1].get(key):
            raise ModelError(f"models differ: {key} is {configs[1].get(key)} in TUNED ({tuned.label}) but "
                             f"{configs[0].get(key)} in BASE ({base.label}); analyze a fine-tune against its base")
    keys_b, keys_t = base_files.keys(), tuned_files.keys()
    if keys_b != keys_t:
        extra = sorted(keys_t - keys_b)
        key = extra[0] if extra else sorted(keys_b - keys_t)[0]
        has, lacks = ("TUNED", "BASE") if extra else ("BASE", "TUNED")
        raise ModelError(f"models differ: {has} has tensor {key} that {lacks} lacks; analyze a fine-tune against "
                         "its base")
    for key in sorted(keys_b):
        if base_files.shape(key) != tuned_files.shape(key):
            raise ModelError(f"models differ: tensor {key} is {tuned_files.shape(key)} in TUNED but "
                             f"{base_files.shape(key)} in BASE; analyze a fine-tune against its base")
        if (base_files.dtype(key) in FLOAT_DTYPES) != (tuned_files.dtype(key) in FLOAT_DTYPES):
            raise ModelError(f"models differ: tensor {key} is {tuned_files.dtype(key)} in TUNED but "
                             f"{base_files.dtype(key)} in BASE")
    return sorted(keys_b)


def analyze(base: str, tuned: str, top_k: int = DEFAULT_TOP_K, threshold: float = DEFAULT_THRESHOLD,
            log=print) -> dict:
    """The whole report (a JSON-ready dict): every tensor's row, sorted by relative update norm, and totals."""
    import torch

    from tunelab.ops.operation import materialize, resolve_input
    from tunelab.ops.safetensors_io import WeightFiles

    if top_k < 1:
        raise ModelError(f"--top-k must be at least 1, not {top_k}")
    if not 0 < threshold <= 1:
        raise ModelError(f"--threshold is a cosine similarity in (0, 1], not {threshold}")
    base_item, tuned_item = resolve_input(base, "base", "BASE"), resolve_input(tuned, "tuned", "TUNED")
    base_item.label, tuned_item.label = "base", "tuned"
    with tempfile.TemporaryDirectory(prefix="tunelab-analyze-") as tmp:
        work = Path(tmp)
        materialize(base_item, work, log=log)
        if tuned_item.adapter:
            _merge_adapter(tuned_item, base_item.model_dir, work, log)
        else:
            materialize(tuned_item, work, log=log)
        base_files = WeightFiles(base_item.model_dir, "BASE")
        tuned_files = WeightFiles(tuned_item.model_dir, "TUNED")
        try:
            keys = _check_same_architecture(base_item, tuned_item, base_files, tuned_files)
            log(f"analyze: {len(keys)} tensors of {tuned_item.path} against {base_item.path}")
            rows = []
            with torch.no_grad():
                for key in keys:
                    row = tensor_stats(base_files.read(key), tuned_files.read(key), tuned_files.dtype(key),
                                       top_k, threshold)
                    rows.append({"name": key, **row})
        finally:
            base_files.close()
            tuned_files.close()
    trainable, source = _trainable(tuned_item, log)
    rows.sort(key=lambda r: (-_sort_norm(r), r["name"]))
    changed_matrices = [r for r in rows if r["intruders"] is not None and r["changed"]]
    total = sum(r["params"] for r in rows)
    changed = sum(r["changed"] for r in rows)

    def mean(key: str) -> float | None:  # over the matrices that changed: an unchanged one has rank 0 by definition
        return sum(r[key] for r in changed_matrices) / len(changed_matrices) if changed_matrices else None

    return {
        "base": str(base_item.path), "tuned": str(tuned_item.path), "tuned_is_adapter": tuned_item.adapter,
        "top_k": top_k, "threshold": threshold,
        "params": total, "changed": changed, "changed_share": changed / total if total else 0.0,
        "trainable": trainable, "trainable_source": source,
        "tensors_changed": sum(1 for r in rows if r["changed"]), "tensors": len(rows),
        "matrices_changed": len(changed_matrices), "matrices": sum(1 for r in rows if r["intruders"] is not None),
        "mean_effective_rank": mean("effective_rank"), "mean_numerical_rank": mean("numerical_rank"),
        "intruders": sum(r["intruders"] or 0 for r in rows),
        "rows": rows,
    }


def _sort_norm(row: dict) -> float:
    """A changed tensor whose base was all zeros has no relative norm: it sorts first."""
    if row["relative_norm"] is None:
        return math.inf if row["changed"] else 0.0
    return row["relative_norm"]


def summary_line(result: dict) -> str:
    trained = (f"; trainable {result['trainable']:,} ({result['trainable_source']})"
               if result["trainable"] is not None else "")
    erank = result["mean_effective_rank"]
    ranks = (f"mean effective rank {erank:.2f} (numerical {result['mean_numerical_rank']:.2f}) over "
             f"{result['matrices_changed']} changed matrices" if erank is not None else "no matrix changed")
    return (f"changed {result['changed']:,} of {result['params']:,} parameters ({100 * result['changed_share']:.2f}%) "
            f"in {result['tensors_changed']} of {result['tensors']} tensors{trained}; {ranks}; "
            f"intruder dimensions {result['intruders']} (top-{result['top_k']}, |cos| < {result['threshold']:g})")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_analysis(result: dict, limit: int = 20, console=None) -> None:
    """The matrices by relative update norm (the first `limit`; 0: all), then the summary line."""
    from rich.table import Table

    from tunelab.console import table_console

    console = console or table_console()
    matrices = [r for r in result["rows"] if r["intruders"] is not None]
    shown = matrices[:limit] if limit > 0 else matrices
    console.print(f"analyze: {result['tuned']} against {result['base']}", markup=False, highlight=False,
                  style="bold")
    grid = Table()
    for col in ("matrix", "shape", "changed", "unchanged", "|dW|", "|dW|/|W|", "rank", "erank", "intruders"):
        grid.add_column(col, justify="left" if col in ("matrix", "shape") else "right")
    for r in shown:
        grid.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['changed']:,}",
                     f"{100 * r['unchanged_share']:.1f}%", f"{r['norm']:.3g}", _num(r["relative_norm"]),
                     str(r["numerical_rank"]), f"{r['effective_rank']:.2f}", str(r["intruders"]))
    console.print(grid)
    if len(shown) < len(matrices):
        console.print(f"{len(shown)} of {len(matrices)} matrices shown (--limit 0: all; --json: every tensor)",
                      markup=False, highlight=False)
    console.print(summary_line(result), markup=False, highlight=False, soft_wrap=True)
