"""Sparse training under fixed pruning masks: every weight trains except the pruned ones, which stay 0.

The masks come from the starting model (`masks.safetensors`, written by `tunelab prune`), from a
file, or are made here by magnitude pruning the starting weights (`sparsity`). Gradients of pruned
weights are zeroed after backward, so the optimizer's moments for them stay 0 and AdamW's update
and decoupled decay leave them at 0; the masks are re-applied after every step as well, so any
optimizer keeps them exactly 0. The masks are method state (saved in checkpoints) and are saved
beside the final model, so a later stage keeps them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError
from tunelab.methods.base import Method


class MaskedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    masks: str | None = None  # masks.safetensors or a model directory holding one; null: the starting model's
    sparsity: float | None = Field(None, ge=0, lt=1)  # prune the starting weights by magnitude to this first
    scope: Literal["layer", "global"] = "layer"  # with sparsity: the same share per matrix, or one threshold


class Masked(Method):
    name = "masked"
    Options = MaskedOptions

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.masks: dict = {}  # parameter name -> bool mask (True = kept), on the CPU
        self._on_device: dict = {}

    def prepare(self, model, ctx):
        from tunelab.ops import prune

        opts = self.options
        source = Path(opts.masks) if opts.masks else (Path(ctx.model_dir) if ctx.model_dir else None)
        found = source is not None and (source.is_file() or (source / prune.MASKS_FILE).is_file())
        if opts.masks and not found:
            raise ConfigError(f"method.options.masks: {opts.masks} is neither a masks file nor a directory holding "
                              f"{prune.MASKS_FILE}")
        previous = prune.load_masks(source) if found else None
        if previous is None and opts.sparsity is None:
            where = f"{ctx.model_dir} has no {prune.MASKS_FILE}" if ctx.model_dir else "a fresh model has no masks"
            raise ConfigError(f"method masked: {where}; prune it first (tunelab prune) or set "
                              "method.options.sparsity to prune the starting weights by magnitude")
        if opts.sparsity is not None:
            params = prune.prunable_params(model) if previous is None else \
                {k: p for k, p in model.named_parameters() if k in previous}
            self.masks = prune.masks_from_scores(prune.magnitude_scores(params), opts.sparsity, opts.scope, previous)
        else:
            self.masks = previous
        prune.apply_masks(model, self.masks)
        for p in model.parameters():
            p.requires_grad_(True)
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        ctx.log(f"masked: {len(self.masks)} matrices, {pruned:,} of {total:,} weights pruned ({pruned / total:.2%}) "
                "and kept at 0")
        return model

    def _device_masks(self, model) -> list:
        if not self._on_device:
            params = dict(model.named_parameters())
            self._on_device = {name: (params[name], mask.to(params[name].device)) for name, mask in self.masks.items()}
        return list(self._on_device.values())

    def after_backward(self, model, step: int) -> None:
        for param, mask in self._device_masks(model):
            if param.grad is not None:
                param.grad.mul_(mask)

    def after_step(self, model, step: int) -> None:
        import torch

        with torch.no_grad():
            for param, mask in self._device_masks(model):
                param.mul_(mask)

    def tensor_state(self) -> dict:
        return {f"mask:{name}": mask for name, mask in self.masks.items()}

    def load_tensor_state(self, tensors: dict) -> None:
        self.masks = {k.removeprefix("mask:"): v.bool().cpu() for k, v in tensors.items() if k.startswith("mask:")}
        self._on_device = {}

    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        from tunelab.ops import prune

        super().save_final(model, tokenizer, out_dir)
        prune.save_masks(self.masks, out_dir)
