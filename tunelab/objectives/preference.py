"""Preference tuning on pairs (format: preference): DPO, and the reference-free SimPO and ORPO.

Each pair is a prompt with a chosen and a rejected reply. A batch (train/batches.py PreferenceBatches)
holds both replies of every pair; one forward gives the summed log-probability of each reply's tokens
(eval/preference.py model_sequence_logps; a chunk of targets at a time
with train.loss_chunk_tokens), and the method turns the two into a loss per pair (mean over pairs):

    dpo     -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])     (Rafailov et al. 2023)
            with label_smoothing ε: (1 - ε) of that + ε of the same with c and r swapped (conservative DPO)
    simpo   -log σ(β (log π(c)/|c| - log π(r)/|r|) - γ)       per-token means, no reference (Meng et al. 2024)
    orpo    -log π(c)/|c| + β · -log σ(log odds(c) - log odds(r)),  odds(y) = p/(1 - p), p = π(y)^(1/|y|),
            no reference (Hong et al. 2024; β is the paper's λ, TRL's ORPOConfig.beta). The NLL term is the
            per-token mean of each chosen reply, averaged over pairs, so any split of a batch adds up the same
            (TRL averages over all chosen tokens of a batch, prompts included: equal only when the prompts are
            empty and the replies of a batch equally long; tests/unit/test_preference_trl.py compares there)

Checked against TRL 1.16 (tests/unit/test_preference_trl.py: losses and gradients on the same model and
tokens). Note that TRL's `loss_type="sigmoid"` ignores its `label_smoothing`; here it is conservative DPO.

Which weights train, and how they are saved, is the method's job (any method that trains by backward: full,
lora, lisa, ...). DPO's reference is the starting model: with an adapter method (peft), the same model with
the adapter disabled (no second copy in memory); otherwise the reference log-probs of every pair the run will
draw are computed once from the starting weights before the first step and kept on the device (a few bytes
per pair). A resumed run computes them again from the same starting weights: the same numbers, so resume
stays exact.

Logged with every train event (means over the logged step's pairs, all processes, like the loss):
rewards_chosen / rewards_rejected (β times the reply's log-ratio to the reference for DPO; β times the
per-token mean log-prob for SimPO and ORPO), reward_margin, reward_accuracy (chosen > rejected),
logps_chosen / logps_rejected (summed log-probs).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError
from tunelab.models import unwrapped
from tunelab.objectives.base import Objective

METRICS = ("logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_margin",
           "reward_accuracy")


class PreferenceObjective(Objective):
    """The shared part: batches of pairs, the replies' log-probs, and the logged rewards."""
    data_format = "preference"
    labels = None

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.dist = None
        self.sums = None  # device tensor: [pairs, *METRICS] summed over this step's micro-batches
        self.step_sums = None  # the same for the last finished step

    def prepare(self, model, ctx):
        self.dist = ctx.dist

    def after_step(self, model, step):
        self.step_sums, self.sums = self.sums, None  # what metrics() reports: this step's pairs, like the loss

    # ---- pairs
    def batch_source(self, default, ctx):
        from tunelab.train.batches import PreferenceBatches

        if not isinstance(default, PreferenceBatches):
            raise ConfigError(f"objective {self.name} trains on preference pairs: data.train needs format: preference")
        return default

    def loss(self, model, batch):
        import torch

        from tunelab.eval.preference import model_sequence_logps

        logps, counts = model_sequence_logps(model, batch["input_ids"], batch["loss_mask"], self.loss_chunk_tokens)
        chosen, rejected = logps.view(2, -1)
        n_chosen, n_rejected = counts.view(2, -1).clamp(min=1)
        losses, reward_chosen, reward_rejected = self.pair_losses(model, batch, chosen, rejected, n_chosen, n_rejected)
        if not model.training:  # a method's calibration pass (sparse), not a training step: not logged
            return losses.mean()
        with torch.no_grad():
            rc, rr = reward_chosen.detach().float(), reward_rejected.detach().float()
            row = torch.stack([torch.ones_like(rc), chosen.detach(), rejected.detach(), rc, rr, rc - rr,
                               (rc > rr).float()]).sum(dim=1)
            self.sums = row if self.sums is None else self.sums + row
        return losses.mean()

    def pair_losses(self, model, batch, chosen, rejected, n_chosen, n_rejected):
        """(loss of each pair, reward of the chosen reply, of the rejected one)."""
        raise NotImplementedError

    def metrics(self) -> dict:
        if self.step_sums is None:
            return {}
        sums = self.dist.all_reduce_sum(self.step_sums.clone()) if self.dist is not None else self.step_sums
        values = (sums[1:] / sums[0].clamp(min=1)).tolist()
        return {name: round(v, 6) for name, v in zip(METRICS, values)}


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0)  # how far the policy may move from the reference (KL weight)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # the share of pairs assumed mislabelled (cDPO)


class DPO(PreferenceObjective):
    name = "dpo"
    Options = DPOOptions

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.reference = None  # None: the adapter-disabled model; else a device tensor [pair id, 2] of log-probs

    def prepare(self, model, ctx):
        super().prepare(model, ctx)
        self.adapter_reference = hasattr(unwrapped(model), "disable_adapter")
        self.model = model  # the starting weights, until the first step: the cached reference is computed on them

    def batch_source(self, default, ctx):
        batches = super().batch_source(default, ctx)
        if not self.adapter_reference:
            self.reference = self.cached_reference(batches, ctx)
        return batches

    def cached_reference(self, batches, ctx):
        """Reference log-probs of every pair this process will draw in the run, from the starting weights."""
        import torch

        from tunelab.eval.preference import pair_logps
        from tunelab.train.precision import autocast_dtype

        started = time.perf_counter()
        model, device = self.model, ctx.device
        dtype = autocast_dtype(ctx.recipe.train.precision)
        table = torch.full((len(batches.index), 2), float("nan"), device=device)
        computed: set[int] = set()
        was_training = model.training
        model.eval()
        try:
            for step in range(ctx.max_steps):
                for ids in batches.micro_batch_ids(step):
                    new = [i for i in ids if i not in computed]  # a later epoch draws pairs already computed
                    if not new:
                        continue
                    batch = {k: v.to(device) for k, v in batches.collate(new).items()}
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        table[batch["pair_id"]] = pair_logps(model, batch, self.loss_chunk_tokens)[0]
                    computed.update(new)
        finally:
            model.train(was_training)
        ctx.log(f"dpo: reference log-probs of {len(computed):,} pairs computed from the starting weights in "
                f"{time.perf_counter() - started:.1f}s (kept for the run)")
        return table

    def pair_losses(self, model, batch, chosen, rejected, n_chosen, n_rejected):
        import torch.nn.functional as F

        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        beta, eps = self.options.beta, self.options.label_smoothing
        logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)

    def reference_logps(self, model, batch):
        import torch

        from tunelab.eval.preference import pair_logps

        if self.reference is not None:
            return self.reference[batch["pair_id"]].t()
        base = unwrapped(model)
        was_training = base.training
        base.eval()  # no dropout in the reference
        try:
            with torch.no_grad(), base.disable_adapter():
                return pair_logps(base, batch, self.loss_chunk_tokens)[0].t()
        finally:
            base.train(was_training)


class SimPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(2.0, gt=0)  # scale of the length-normalised reward (the paper uses 2 to 2.5)
    gamma: float = Field(1.0, ge=0)  # target reward margin (the paper: gamma / beta about 0.5)


class SimPO(PreferenceObjective):
    name = "simpo"
    Options = SimPOOptions

    def pair_losses(self, model, batch, chosen, rejected, n_chosen, n_rejected):
        import torch.nn.functional as F

        beta = self.options.beta
        reward_chosen, reward_rejected = beta * chosen / n_chosen, beta * rejected / n_rejected
        return -F.logsigmoid(reward_chosen - reward_rejected - self.options.gamma), reward_chosen, reward_rejected


class ORPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0)  # weight of the odds-ratio term against the NLL of the chosen reply (λ)


class ORPO(PreferenceObjective):
    name = "orpo"
    Options = ORPOOptions

    def pair_losses(self, model, batch, chosen, rejected, n_chosen, n_rejected):
        import torch
        import torch.nn.functional as F

        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected

        def log_odds(mean_logp):  # log(p / (1 - p)); p stays below 1 - 1e-6 so the log stays finite
            return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-6)))

        ratio = F.logsigmoid(log_odds(mean_chosen) - log_odds(mean_rejected))
        beta = self.options.beta
        return -mean_chosen - beta * ratio, beta * mean_chosen, beta * mean_rejected
