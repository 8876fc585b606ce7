"""The method protocol: the only way a training method changes what the loop does.

The loop in train/loop.py calls these hooks, in this order, and nothing method-specific besides:

    set-up:    model = method.prepare(model, ctx)        # freeze, wrap (peft), add masks, load masks
               method.aux_models()                       # {name: AuxModel}: moved to ctx.device, eval mode,
                                                         #   never in the optimizer or in checkpoints
               method.batch_source(default, ctx)         # the batches to train on (default: packed text)
    resume:    method.load_state_dict(state), method.load_tensor_state(tensors)
               method.load_weights(model, tensors)       # what weights_to_save() saved
    each step: method.select_trainable(model, step)      # True: the trainable set changed (LISA), so the
                                                         #   loop rebuilds the optimizer and the DDP wrapper
               params = method.trainable_params(model)   # [(name, param)] handed to the optimizer
               every micro-batch:  loss = objective.loss(model, batch); backward   (objectives/base.py)
               method.after_backward(model, step)        # e.g. mask gradients (sparse fine-tuning)
               optimizer.step()
               method.after_step(model, step)            # e.g. re-apply pruning masks
    checkpoint: method.state_dict()      -> JSON (state.json)
                method.tensor_state()    -> tensors (method.safetensors): masks, index sets
                method.weights_to_save(model) -> None: the whole model; a dict: only these tensors
                                         (an adapter); the checkpoint then records the base's hash
    end:        method.save_final(model, tokenizer, out_dir)   # HF model, or a PEFT adapter
    recipe:     method.gradient_checkpointing_refusal() -> why train.gradient_checkpointing cannot be used
                                         (None: it can; checked when the recipe is loaded)
                method.chunked_loss_refusal() -> the same for train.loss_chunk_tokens

What the loss is belongs to the objective (objectives/base.py), the other axis: a method that runs
the loss itself (MeZO, sparse's calibration) calls `ctx.objective.loss`.
A method with no backward pass (MeZO) sets `uses_backward = False` and implements
`train_step(model, batches, step, lr) -> mean loss`; the loop then skips backward, the optimizer and
the DDP wrapper (there are no gradients to synchronise): under DDP such a method all-reduces what it
needs itself (ctx.dist) so that every process applies the same update.

Methods are small classes with these defaults, registered by name in methods/__init__.py. Options
come from the recipe's `method.options`, validated by the method's pydantic `Options` model when
the recipe is loaded. Importing a method module must not import torch (recipes validate without
it): import heavy libraries inside the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What a method may need at set-up, handed to `prepare` and `batch_source`."""
    device: Any  # torch.device of this process
    dist: Any  # train.dist.Dist: rank, world, collectives
    recipe: Any  # the validated recipe (read-only)
    tokenizer: Any
    max_steps: int
    seed: int
    run_path: Path | None = None
    log: Callable = print
    base_sha256: str | None = None  # hash of the starting weights (before prepare)
    model_dir: Path | None = None  # the directory the starting weights came from (None: a fresh preset)
    objective: Any = None  # objectives.base.Objective: the run's loss, for methods that run it themselves


@dataclass
class AuxModel:
    """A model a method owns besides the one being trained (a teacher, a DPO reference).

    It follows the device, is frozen and in eval mode, and is never checkpointed: the checkpoint
    records `reference` and `sha256`, and a resume refuses an aux model whose hash changed.
    """
    module: Any
    reference: str  # where it came from (a path, a preset), for lineage
    sha256: str  # content hash of its weights
    extra: dict = field(default_factory=dict)


def lm_loss(model, batch: dict[str, "torch.Tensor"], chunk_tokens: int | None = None) -> "torch.Tensor":
    """Mean next-token (or masked-token) cross-entropy over the batch's targets; HF shifts labels.

    use_cache=False: with a KV cache transformers ignores restarting position ids, and
    `packing: document` would silently let attention cross documents.
    `chunk_tokens` (train.loss_chunk_tokens): the same loss with the head's logits never whole.
    """
    if chunk_tokens is not None:
        from tunelab.train.chunked_loss import chunked_lm_loss

        return chunked_lm_loss(model, batch, chunk_tokens)
    return model(**batch, use_cache=False).loss


class Method:
    name = "base"
    Options: type[BaseModel] = NoOptions
    uses_backward = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "loss" in vars(cls):  # the loop would never call it: say so where the class is written
            raise TypeError(f"{cls.__name__}.loss: a method chooses the weights; the loss is an objective's "
                            "(tunelab/objectives/)")

    def __init__(self, options: dict | None = None):
        self.options = self.Options.model_validate(options or {})

    # ---- set-up
    def prepare(self, model, ctx: MethodContext):
        return model

    def aux_models(self) -> dict[str, AuxModel]:
        return {}

    def batch_source(self, default, ctx: MethodContext):
        """The source of training batches; `default` packs the recipe's text (train/batches.py)."""
        return default

    # ---- each step
    def select_trainable(self, model, step: int) -> bool:
        return False

    def trainable_params(self, model) -> list[tuple[str, "torch.nn.Parameter"]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def train_step(self, model, batches: list[dict], step: int, lr: float) -> "torch.Tensor":
        raise NotImplementedError(f"method {self.name} sets uses_backward=False but has no train_step")

    def after_backward(self, model, step: int) -> None:
        pass

    def after_step(self, model, step: int) -> None:
        pass

    def gradient_checkpointing_refusal(self) -> str | None:
        """Why train.gradient_checkpointing cannot be used with this method (None: it can)."""
        if not self.uses_backward:
            return f"{self.name} has no backward pass, so it keeps no activations to recompute"
        return None

    def chunked_loss_refusal(self) -> str | None:
        """Why train.loss_chunk_tokens cannot be used with this method (None: it can)."""
        return None

    # ---- checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensor_state(self) -> dict[str, "torch.Tensor"]:
        return {}

    def load_tensor_state(self, tensors: dict[str, "torch.Tensor"]) -> None:
        pass

    def weights_to_save(self, model) -> dict[str, "torch.Tensor"] | None:
        """None: checkpoints hold the whole model. An adapter returns only its own tensors."""
        return None

    def load_weights(self, model, tensors: dict[str, "torch.Tensor"]) -> None:
        """Load what `weights_to_save` returned (only called when it returns a dict)."""
        raise NotImplementedError

    # ---- end
    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
