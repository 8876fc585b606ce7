"""Unstructured pruning: which weights to zero (magnitude, Wanda), masks on disk, the sparsity report.

A mask is a bool tensor per pruned matrix (True = kept). The pruned model is an ordinary HF model
whose pruned weights are 0; `masks.safetensors` beside it records which zeros are pruned, so the
`masked` method (methods/masked.py) keeps them at 0 through any later training.

What is pruned by default: the attention and FFN projections of every block, as the architecture
table (tunelab/arch.py) names them, as in the magnitude-pruning, lottery-ticket and Wanda papers.
Embeddings, the LM head, norms and biases are kept dense. `targets` (regexes over the names of
linear weights) overrides this, for any model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tunelab.arch import arch_of, is_conv1d
from tunelab.errors import ConfigError, ModelError

MASKS_FILE = "masks.safetensors"


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def prunable_params(model, targets: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """name -> weight of every matrix pruning applies to (see the module docstring), in model order."""
    if targets is None:
        spec = arch_of(model, "prune (default targets; or give targets, regexes over weight names)")
        wanted = {f"{spec.blocks}.{i}.{p}" for i in range(len(spec.block_list(model))) for p in spec.projections}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = {}
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight"
        if targets is None:
            take = module_name in wanted
        else:
            take = _is_linear(module) and module is not output and any(re.search(t, name) for t in targets)
        if take:
            chosen[name] = module.weight
    if not chosen:
        names = [f"{n}.weight" for n, m in model.named_modules() if _is_linear(m)][:8]
        raise ModelError(f"prune: targets {targets} match no linear weights to prune; linear weights: "
                         f"{', '.join(names) or 'none'}")
    return chosen


def _count(sparsity: float, n: int) -> int:
    return int(round(sparsity * n))


def lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask (any shape, CPU) of exactly the n lowest scores; ties go to the earlier flat index.

    np.partition finds the n-th value on one copy of the scores (4 bytes each); an argsort or torch.topk
    holds an int64 index per score as well (2.5 GB more at 200M parameters)."""
    import numpy as np

    flat = scores.reshape(-1)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if n > 0:
        nth = torch.tensor(np.partition(flat.numpy(), n - 1)[n - 1])
        chosen = flat < nth
        chosen[(flat == nth).nonzero().squeeze(1)[:n - int(chosen.sum())]] = True
    return chosen.reshape(scores.shape)


def select_global(scores: dict[str, torch.Tensor], n: int, largest: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks of exactly the n lowest (`largest`: highest) scores over all tensors together; ties go to
    the earlier entry (tensor order, then flat position). Global pruning and sparse fine-tuning's choice."""
    names = list(scores)
    flat = torch.cat([scores[k].detach().float().cpu().reshape(-1) for k in names])
    if largest:
        flat.neg_()  # the n highest are the n lowest of the negated scores, with the same tie rule
    chosen = lowest(flat, n)
    masks, start = {}, 0
    for k in names:
        size = scores[k].numel()
        masks[k] = chosen[start:start + size].reshape(scores[k].shape)
        start += size
    return masks


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer",
                      previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Prune the lowest scores to `sparsity`: per matrix ("layer"), over all matrices at once ("global"),
    or per output row ("row", Wanda's comparison group). Weights already pruned in `previous` stay pruned
    and count towards the sparsity (iterative pruning). The count pruned is exactly round(sparsity * n)
    in each group (at least what `previous` pruned)."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity: {sparsity} is outside [0, 1); give the share of weights to prune, e.g. 0.5")
    scores = {k: v.detach().float().cpu() for k, v in scores.items()}
    if previous:  # pruned weights are pruned first, whatever their score
        scores = {k: torch.where(previous[k].cpu(), v, torch.full_like(v, -torch.inf)) for k, v in scores.items()}

    def already(group_mask):
        return int((~group_mask).sum()) if group_mask is not None else 0

    if scope == "global":
        total = sum(v.numel() for v in scores.values())
        n_prune = max(_count(sparsity, total), sum(already(previous[k]) for k in scores) if previous else 0)
        return {k: ~pruned for k, pruned in select_global(scores, n_prune).items()}
    if scope == "layer":
        return {k: ~lowest(v, max(_count(sparsity, v.numel()), already(previous[k] if previous else None)))
                for k, v in scores.items()}
    if scope == "row":
        out = {}
        for k, v in scores.items():
            rows = v.reshape(v.shape[0], -1)
            prev = previous[k].reshape(rows.shape).cpu() if previous else None
            out[k] = torch.stack([~lowest(r, max(_count(sparsity, r.numel()),
                                                 already(prev[i] if prev is not None else None)))
                                  for i, r in enumerate(rows)]).reshape(v.shape)
        return out
    raise ConfigError(f"scope: {scope!r} is not one of global, layer, row")


def magnitude_scores(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: p.detach().abs() for k, p in params.items()}


@torch.no_grad()
def input_norms(model, params: dict[str, torch.Tensor], batches: list[dict]) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ per input feature j of each pruned linear layer, over every non-padding calibration token."""
    modules = {f"{n}.weight": m for n, m in model.named_modules() if f"{n}.weight" in params}
    sums = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in modules.items()}
    current: dict = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().double()
            mask = current.get("mask")
            if mask is not None and mask.shape == x.shape[:-1]:
                x = x[mask.bool()]
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()
        return record

    handles = [m.register_forward_hook(hook(k)) for k, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: s.sqrt().float() for k, s in sums.items()}


def wanda_scores(model, params: dict[str, torch.Tensor], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Wanda (Sun et al. 2023): |W_ij| · ‖x_j‖₂, the weight's size times its input's size on calibration data."""
    if not batches:
        raise ConfigError("calibration.data: wanda needs calibration text (give sources, e.g. builtin:prose)")
    modules = dict(model.named_modules())
    if any(not isinstance(modules.get(k.removesuffix(".weight")), torch.nn.Linear) for k in params):
        raise ModelError(f"wanda: {model.config.model_type} stores its projections transposed (GPT-2's Conv1D), "
                         "which Wanda's per-row comparison does not handle; use method magnitude")
    norms = input_norms(model, params, batches)
    return {k: p.detach().abs().float().cpu() * norms[k].unsqueeze(0) for k, p in params.items()}


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight (in place)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ModelError(f"masks: {name} is not a parameter of this model (masks from another architecture?)")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ModelError(f"masks: {name} has shape {tuple(mask.shape)} but the model's is {tuple(params[name].shape)}")
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def save_masks(masks: dict[str, torch.Tensor], model_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bool).contiguous() for k, v in masks.items()}, str(Path(model_dir) / MASKS_FILE))


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    file = path / MASKS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelError(f"{file}: no pruning masks here; prune the model first (tunelab prune) or give the masks file")
    return {k: v.to(torch.bool) for k, v in load_file(str(file)).items()}


def sparsity_report(model, masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Per matrix: shape, zeros and sparsity (counted on the weights, so it shows drift too); totals over the
    pruned matrices and over the whole model."""
    params = dict(model.named_parameters())
    names = list(masks) if masks else [k for k in prunable_params(model)]
    rows = []
    for name in names:
        p = params[name].detach()
        zeros = int((p == 0).sum())
        row = {"name": name, "shape": list(p.shape), "numel": p.numel(), "zeros": zeros,
               "sparsity": zeros / p.numel()}
        if masks:
            row["pruned"] = int((~masks[name]).sum())
            row["pruned_nonzero"] = int((p[~masks[name].to(p.device)] != 0).sum())  # drift: must stay 0
        rows.append(row)
    total = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    all_params = sum(p.numel() for p in params.values())
    all_zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    return {"matrices": rows, "pruned_params": total, "pruned_zeros": zeros, "sparsity": zeros / max(total, 1),
            "model_params": all_params, "model_nonzero": all_params - all_zeros,
            "model_sparsity": all_zeros / max(all_params, 1)}


def render_sparsity(report: dict, limit: int = 40) -> str:
    rows = report["matrices"]
    width = max([len(r["name"]) for r in rows[:limit]] + [6])
    lines = [f"{'matrix'.ljust(width)}  {'shape':>12}  {'zeros':>10}  {'sparsity':>8}"]
    for r in rows[:limit]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name'].ljust(width)}  {shape:>12}  {r['zeros']:>10,}  {r['sparsity']:>8.2%}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more matrices (all in prune.json)")
    lines.append(f"{'pruned matrices'.ljust(width)}  {'':>12}  {report['pruned_zeros']:>10,}  {report['sparsity']:>8.2%}")
    lines.append(f"{'whole model'.ljust(width)}  {'':>12}  {report['model_params'] - report['model_nonzero']:>10,}  "
                 f"{report['model_sparsity']:>8.2%}")
    return "\n".join(lines)


def random_masks_like(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The random-ticket control: per matrix the same number of pruned weights, at random positions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        n_prune = int((~mask).sum())
        keep = torch.ones(mask.numel(), dtype=torch.bool)
        keep[torch.randperm(mask.numel(), generator=g)[:n_prune]] = False
        out[name] = keep.reshape(mask.shape)
    return out
