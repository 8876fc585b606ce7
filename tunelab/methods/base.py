"""The hook protocol through which a training method changes what the loop does.

The loop in train/loop.py calls these, in this order, and nothing else method-specific:

    model = method.prepare(model)                 # freeze, wrap (peft), add masks, load a teacher
    params = method.trainable_params(model)       # [(name, param)] handed to the optimizer
    every micro-batch:  loss = method.loss(model, batch)   # mean loss over the batch's targets
                        loss.backward()
    every step:         method.after_backward(model, step)   # e.g. mask gradients (sparse FT)
                        optimizer.step()
                        method.after_step(model, step)       # e.g. re-apply pruning masks, LISA layer switch
    checkpoint:         method.state_dict() / load_state_dict(state)   # JSON-serialisable state
    end:                method.save_final(model, tokenizer, out_dir)   # HF model, or PEFT adapter

A method with no backward pass (MeZO) sets `uses_backward = False` and implements
`train_step(model, batch, step, lr) -> loss`; the loop then skips backward/optimizer for it.
Methods are small classes with these defaults; the registry in methods/__init__.py maps names
to them. Method options come from the recipe's `method.options` and are validated by the
method's own pydantic `Options` model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token (or masked-token) cross-entropy; HF shifts labels inside the model.

    use_cache=False: with a KV cache transformers ignores restarting position ids, and
    `packing: document` would silently let attention cross documents.
    """
    return model(**batch, use_cache=False).loss


class Method:
    name = "base"
    Options: type[BaseModel] = NoOptions
    uses_backward = True

    def __init__(self, options: dict | None = None):
        self.options = self.Options.model_validate(options or {})

    def prepare(self, model):
        return model

    def trainable_params(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model, batch)

    def after_backward(self, model, step: int) -> None:
        pass

    def after_step(self, model, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
