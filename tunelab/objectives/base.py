"""The objective protocol: what the loss is, independent of which weights train (the method's job).

The training stage and the loop call, beside the method's hooks (methods/base.py):

    set-up:    objective.prepare(model, ctx)             # after method.prepare: e.g. DPO's reference
               objective.aux_models()                    # {name: AuxModel}: a teacher, a reference
               objective.batch_source(default, ctx)      # the batches (default: packed text or pairs)
    each step: every micro-batch:  loss = objective.loss(model, batch); backward
               objective.after_step(model, step)
    log steps: objective.metrics() -> {name: value}       # on every process: it may all-reduce
    recipe:    objective.refusal(method) -> why this objective cannot train with that method (None: it can)
               objective.chunked_loss_refusal() -> why train.loss_chunk_tokens cannot be used

`data_format` is what data.train must hold ("text": text or chat sources; "preference": pairs), `model_kind`
the model it trains ("causal" or "encoder"); the recipe check refuses anything else before any work.
Methods that run the loss themselves (MeZO's forward passes, sparse fine-tuning's calibration) call
`ctx.objective.loss`. Like methods, objective modules import torch inside their hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import AuxModel, NoOptions, lm_loss

if TYPE_CHECKING:
    import torch


class Objective:
    name = "base"
    Options = NoOptions
    data_format = "text"
    model_kind = "causal"
    labels = "clm"  # how text batches are labelled (train/objectives.py add_labels): clm or mlm
    loss_chunk_tokens: int | None = None  # train.loss_chunk_tokens, set by the training stage

    def __init__(self, options: dict | None = None):
        self.options = self.Options.model_validate(options or {})

    def prepare(self, model, ctx) -> None:
        pass

    def aux_models(self) -> dict[str, AuxModel]:
        return {}

    def batch_source(self, default, ctx):
        return default

    def loss(self, model, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        return lm_loss(model, batch, self.loss_chunk_tokens)

    def after_step(self, model, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def refusal(self, method) -> str | None:
        if not method.uses_backward and type(self).loss is not Objective.loss:
            return f"{method.name} has no backward pass and estimates the gradient of the LM loss only"
        return None

    def chunked_loss_refusal(self) -> str | None:
        return None

    def masking(self, tokenizer) -> dict | None:
        """How text is masked for this objective (the keyword arguments of add_labels), None: not at all."""
        return None
