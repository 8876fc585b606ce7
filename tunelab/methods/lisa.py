"""LISA (Pan et al. 2024, "Layerwise Importance Sampling"): full fine-tuning of a few blocks at a time.

Everything outside the transformer blocks (embeddings, LM head, final norm) always trains; of the
blocks, `gamma` chosen uniformly at random train for `interval` steps, the others are frozen. The
loop rebuilds the optimizer (and the DDP wrapper) whenever the trainable set changes: moments of
parameters that stay trainable carry over, those of frozen blocks are dropped, so optimizer memory
is that of the always-trained parameters plus `gamma` blocks.

The draw for period p (steps p*interval ...) is a pure function of the run seed and p, and the
blocks drawn so far are method state (state.json), so a resumed run, and every DDP process, trains
the same blocks at the same steps as an uninterrupted single-process run.

`PeriodicSelection` is the part LISA shares with HFT (methods/hft.py): a trainable set re-drawn
every period from (seed, period), applied through requires_grad in `select_trainable`.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from tunelab.arch import block_params
from tunelab.errors import ConfigError
from tunelab.methods.base import Method


class PeriodicSelection(Method):
    """A trainable set drawn afresh every `interval` steps (None: once for the whole run) from
    (run seed, period); subclasses say what one draw is (`draw`) and which parameters it trains
    (`trainable_names`). The current period's draw is method state, so resume uses the very same one."""

    seed_tag = 0  # set apart per subclass: two methods with one seed draw independently

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.seed = 0
        self.applied: int | None = None  # the period whose draw the requires_grad flags show
        self.saved: dict = {}  # period (str) -> draw, from state.json (a resumed run) and drawn since

    def period_of(self, step: int) -> int:
        interval = self.options.interval
        return step // interval if interval else 0

    def rng(self, period: int) -> random.Random:
        from tunelab.train.objectives import sequence_seed

        return random.Random(sequence_seed(self.seed, period, self.seed_tag))

    def draw_for(self, period: int) -> list:
        key = str(period)
        if key not in self.saved:
            self.saved[key] = self.draw(self.rng(period))
        return self.saved[key]

    def select_trainable(self, model, step: int) -> bool:
        period = self.period_of(step)
        if period == self.applied:
            return False
        trainable = self.trainable_names(self.draw_for(period))
        changed = False
        for name, param in model.named_parameters():
            changed |= param.requires_grad != (name in trainable)
            param.requires_grad_(name in trainable)
        self.applied = period
        self.saved = self.kept_draws()  # HFT keeps only the current draw, LISA the whole schedule
        return changed  # the same set drawn again: the optimizer (and DDP) stay as they are

    def state_dict(self) -> dict:
        return {"period": self.applied, "draws": self.kept_draws()}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state.get("draws", {}))
        self.applied = None  # the flags are set again by the loop's select_trainable

    def kept_draws(self) -> dict:
        return {str(self.applied): self.saved[str(self.applied)]} if self.applied is not None else {}


class LisaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: int = Field(2, ge=1)  # transformer blocks trained at a time
    interval: int = Field(20, ge=1)  # steps between draws (the paper's K)


class LISA(PeriodicSelection):
    name = "lisa"
    Options = LisaOptions
    seed_tag = 1  # keeps LISA's draws independent of HFT's for the same seed

    def prepare(self, model, ctx):
        self.seed = ctx.seed
        self.prefix, self.blocks = block_params(model, "method lisa")
        gamma, n = self.options.gamma, len(self.blocks)
        if gamma > n:
            raise ConfigError(f"method.options.gamma: {gamma} is more than the model's {n} transformer blocks; "
                              f"choose 1 to {n}")
        self.always = {name for name, _ in model.named_parameters()} - {n for b in self.blocks for n in b}
        ctx.log(f"lisa: {gamma} of {n} blocks trained at a time, re-drawn every {self.options.interval} steps; "
                f"{len(self.always)} tensors outside the blocks always trained")
        self.select_trainable(model, 0)  # so the stage's count of trainable parameters is that of a step
        return model

    def draw(self, rng: random.Random) -> list[int]:
        return sorted(rng.sample(range(len(self.blocks)), self.options.gamma))

    def trainable_names(self, layers: list[int]) -> set[str]:
        return self.always | {name for i in layers for name in self.blocks[i]}

    def kept_draws(self) -> dict:
        # Every period's blocks so far (a few integers each): the run's whole schedule is in state.json.
        return dict(self.saved)
