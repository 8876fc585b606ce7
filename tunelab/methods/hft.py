"""HFT (Hui et al. 2024, "Half Fine-Tuning"): a random half of the parameter tensors is frozen, the rest trains.

Freezing half of the pretrained weights keeps part of the old knowledge untouched, which is where
the method's smaller forgetting comes from. The half is drawn per category so that every kind of
weight keeps (and trains) about half of its tensors: within each transformer block, the attention
tensors, the feed-forward tensors and the norms are three categories (as the architecture table,
tunelab/arch.py, names a block's parts), and the tensors outside the
blocks (embeddings, final norm, LM head) are one more. In a category of n tensors, n // 2 are
frozen, and one more with probability 1/2 when n is odd.

With `interval: null` (the default, the paper's setting) the half is drawn once for the whole run;
with `interval: K` it is drawn afresh every K steps (the loop rebuilds the optimizer; moments of
tensors that stay trainable carry over). A draw is a pure function of the run seed and the period,
and the current draw is method state, so resume and DDP processes freeze the same tensors.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from tunelab.arch import arch_of, block_params
from tunelab.methods.lisa import PeriodicSelection


class HftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval: int | None = Field(None, ge=1)  # steps between draws; null: one draw for the whole run


def hft_categories(model) -> list[list[str]]:
    """Parameter names grouped into HFT's categories (see the module docstring), in model order."""
    spec = arch_of(model, "method hft")
    prefix, blocks = block_params(model, "method hft")
    parts = {"norm": spec.norms, "attention": (*spec.qkv, spec.attn_out), "ffn": (*spec.ffn_in, spec.ffn_out)}
    block_of = {name: i for i, block in enumerate(blocks) for name in block}
    groups: dict[tuple, list[str]] = {}
    for name in (n for n, _ in model.named_parameters()):
        if name in block_of:
            inside = name[len(prefix) + 1:].split(".", 1)[1]  # e.g. self_attn.q_proj.weight
            key = (block_of[name], next(part for part, modules in parts.items()
                                        if any(inside.startswith(m + ".") for m in modules)))
        else:
            key = ("outside",)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class HFT(PeriodicSelection):
    name = "hft"
    Options = HftOptions
    seed_tag = 2

    def prepare(self, model, ctx):
        self.seed = ctx.seed
        self.categories = hft_categories(model)
        every = f"every {self.options.interval} steps" if self.options.interval else "once for the run"
        ctx.log(f"hft: half of the tensors of each of {len(self.categories)} categories frozen, drawn {every}")
        self.select_trainable(model, 0)  # so the stage's count of trainable parameters is that of a step
        return model

    def draw(self, rng: random.Random) -> list[str]:
        """The names frozen in one period."""
        frozen = []
        for names in self.categories:
            k = len(names) // 2 + (len(names) % 2 == 1 and rng.random() < 0.5)
            frozen += rng.sample(names, k)
        return sorted(frozen)

    def trainable_names(self, frozen: list[str]) -> set[str]:
        return {n for names in self.categories for n in names} - set(frozen)
