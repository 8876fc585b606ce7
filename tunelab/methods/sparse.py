"""Sparse fine-tuning: a fixed budget of individual weights trains, every other weight keeps its base value.

Which weights ("Composable Sparse Fine-Tuning", Ansell et al. 2022; "Scaling Sparse Fine-Tuning to
LLMs", Ansell et al. 2024): among the candidate matrices (the blocks' linear weights, as pruning
uses; `targets` regexes choose others), the `budget` entries (or the share `density`) with the
largest score over all candidates at once:
    select: grad    |Σ gradient| of the loss over the first `calibration_steps` global batches of the
                    training data (the data stream is rewound afterwards, so training sees the same
                    batches); under DDP the gradients are summed over processes, so every process
                    picks the same entries, the ones a single process would
    select: weight  |w| of the starting weights
The choice is made once, just before the first step (`select_trainable`: the weights and, on
resume, the saved masks are loaded by then), and the masks are method state (method.safetensors).

Training: gradients of unselected entries are zeroed after backward, so their optimizer moments
stay 0 and the update leaves them alone; weight decay would still shrink them (AdamW decays every
entry of a matrix, SGD adds wd·w to the gradient), so with train.weight_decay > 0 the base values
of the candidate matrices are kept on the device and the unselected entries are put back after
every step (one extra copy of those matrices; weight_decay: 0 avoids it). Memory otherwise is that
of full fine-tuning of the candidate matrices (dense gradients and moments): the sparsity is in
what changes and in what is saved, not in training memory.

final/ holds the whole tuned model (every tunelab command loads it) and `sparse_delta.safetensors`:
per tuned tensor `NAME.indices` (flat int64 positions) and `NAME.values` (the tuned values there),
with the base weights' sha256 in the header. `apply_sparse_delta(base_model, path)` writes the
values into the base in place, which reproduces the tuned model bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.base import Method

DELTA_FILE = "sparse_delta.safetensors"
DELTA_FORMAT = "tunelab-sparse-delta-1"


class SparseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    density: float | None = Field(None, gt=0, le=1)  # share of the candidate weights that train (default 0.01)
    budget: int | None = Field(None, ge=1)  # or: how many weights train
    select: Literal["grad", "weight"] = "grad"
    calibration_steps: int = Field(4, ge=1)  # global batches whose gradient scores the weights (select: grad)
    targets: list[str] | None = None  # regexes over parameter names; default: the blocks' linear weights

    @model_validator(mode="after")
    def _one_size(self):
        if self.density is not None and self.budget is not None:
            raise ValueError("give density or budget, not both")
        for pattern in self.targets or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"targets: {pattern!r} is not a regular expression ({err})") from None
        return self


def save_sparse_delta(model, masks: dict, path: Path, base_sha256: str | None) -> None:
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tensors = {}
    for name, mask in masks.items():
        flat_index = mask.reshape(-1).nonzero().squeeze(1)
        values = params[name].detach().reshape(-1)[flat_index.to(params[name].device)]
        tensors[f"{name}.indices"] = flat_index.contiguous()
        tensors[f"{name}.values"] = values.cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": DELTA_FORMAT, "base_sha256": base_sha256 or ""})


def apply_sparse_delta(base_model, delta_path, check_base: bool = True):
    """Write a sparse delta (a `sparse` run's final/, or its sparse_delta.safetensors) into `base_model`
    in place and return it. With `check_base`, the base must be the weights the run started from
    (sha256 recorded in the delta): the delta holds the tuned values, not differences, so it
    reproduces the tuned model exactly only on its own base."""
    import torch
    from safetensors import safe_open

    from tunelab.models import weights_sha256

    path = Path(delta_path)
    path = path / DELTA_FILE if path.is_dir() else path
    if not path.is_file():
        raise ModelError(f"{delta_path}: no {DELTA_FILE} (a sparse fine-tuning run's final/ holds one)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != DELTA_FORMAT:
        raise ModelError(f"{path}: not a tunelab sparse delta (format {meta.get('format')!r})")
    if check_base and meta.get("base_sha256") and weights_sha256(base_model) != meta["base_sha256"]:
        raise ModelError(f"{path} was trained from other base weights (sha256 {meta['base_sha256'][:12]}...): "
                         "apply it to the model the run started from, or pass check_base=False")
    params = dict(base_model.named_parameters())
    with torch.no_grad():
        for key in (k for k in tensors if k.endswith(".indices")):
            name = key.removesuffix(".indices")
            if name not in params:
                raise ModelError(f"{path}: the base model has no parameter {name}")
            param, index = params[name], tensors[key]
            if index.numel() and int(index.max()) >= param.numel():
                raise ModelError(f"{path}: {name} indices exceed its {param.numel()} entries (another model?)")
            param.view(-1)[index.to(param.device)] = tensors[f"{name}.values"].to(param.device, param.dtype)
    return base_model


class SparseFT(Method):
    name = "sparse"
    Options = SparseOptions

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.masks: dict = {}  # parameter name -> bool mask (True = trains), on the CPU; only tensors with any
        self.on_device: list = []  # (param, mask, base values or None) once set up
        self.source = None

    def prepare(self, model, ctx):
        from tunelab.ops import prune
        from tunelab.train.precision import autocast_dtype

        opts = self.options
        try:
            self.candidates = prune.prunable_params(model, opts.targets)
        except ModelError as err:
            raise ConfigError(f"method.options.targets: {err}") from None
        total = sum(p.numel() for p in self.candidates.values())
        self.k = opts.budget if opts.budget is not None else max(1, round((opts.density or 0.01) * total))
        if self.k > total:
            raise ConfigError(f"method.options.budget: {self.k:,} is more than the {total:,} candidate weights")
        self.dist, self.base_sha256, self.objective = ctx.dist, ctx.base_sha256, ctx.objective
        self.autocast = autocast_dtype(ctx.recipe.train.precision)
        self.restore = ctx.recipe.train.weight_decay > 0
        self.log = ctx.log
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.candidates)
        ctx.log(f"sparse: {self.k:,} of {total:,} weights in {len(self.candidates)} matrices will train, chosen by "
                f"{opts.select} magnitude" + (" (base values kept to undo weight decay)" if self.restore else ""))
        return model

    def batch_source(self, default, ctx):
        self.source = default  # the calibration batches come from the training stream (then rewound)
        return default

    # ---- choosing the weights, once, before the first step
    def gradient_scores(self, model) -> dict:
        import torch

        if self.source is None:
            raise ConfigError("method sparse: select: grad needs the training batches; use select: weight")
        params = dict(model.named_parameters())
        device = next(iter(self.candidates.values())).device
        state = self.source.state_dict()
        was_training = model.training
        model.eval()  # no dropout: the scores do not depend on a random stream
        try:
            for step in range(self.options.calibration_steps):
                for batch, count in self.source.next(step):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
                        loss = self.objective.loss(model, batch)
                    (loss.float() * count).backward()  # token sums: any split of the batch adds up the same
        finally:
            self.source.load_state_dict(state)
            model.train(was_training)
        scores = {}
        for name in self.candidates:
            grad = params[name].grad
            grad = torch.zeros_like(params[name]) if grad is None else grad
            if self.dist is not None and self.dist.enabled:
                self.dist.all_reduce_sum(grad)
            scores[name] = grad.abs()
            params[name].grad = None
        return scores

    def select_trainable(self, model, step: int) -> bool:
        import torch

        from tunelab.ops import prune

        if self.on_device:
            return False
        if not self.masks:  # a fresh run (a resumed one has its masks from method.safetensors)
            scores = self.gradient_scores(model) if self.options.select == "grad" else \
                {n: p.detach().abs() for n, p in self.candidates.items()}
            self.masks = {n: m for n, m in prune.select_global(scores, self.k, largest=True).items() if m.any()}
            self.log(f"sparse: chose {self.k:,} weights by {self.options.select} magnitude, in {len(self.masks)} of "
                     f"{len(self.candidates)} matrices")
        params = dict(model.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in self.masks)
        with torch.no_grad():
            self.on_device = [(params[n], m.to(params[n].device), params[n].detach().clone() if self.restore else None)
                              for n, m in self.masks.items()]
        return True

    def trained_entries(self) -> dict:
        """name -> bool mask of the entries that may change (read by the method suite; the loop never asks)."""
        return dict(self.masks)

    # ---- training
    def after_backward(self, model, step: int) -> None:
        for param, mask, _ in self.on_device:
            if param.grad is not None:
                param.grad.mul_(mask)

    def after_step(self, model, step: int) -> None:
        import torch

        if self.restore:
            with torch.no_grad():
                for param, mask, base in self.on_device:
                    param.copy_(torch.where(mask, param, base))

    # ---- state and output
    def tensor_state(self) -> dict:
        return {f"mask:{name}": mask for name, mask in self.masks.items()}

    def load_tensor_state(self, tensors: dict) -> None:
        self.masks = {k.removeprefix("mask:"): v.bool().cpu() for k, v in tensors.items() if k.startswith("mask:")}
        self.on_device = []

    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        super().save_final(model, tokenizer, out_dir)
        save_sparse_delta(model, self.masks, out_dir / DELTA_FILE, self.base_sha256)
