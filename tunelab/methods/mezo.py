"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): zeroth-order SGD.

One step, with z ~ N(0, I) over all trained parameters, generated from a seed and never stored:

    θ += εz; L+ = loss(θ)          perturb in place, one forward pass
    θ -= 2εz; L- = loss(θ)         the other side, one forward pass (same dropout masks)
    θ += εz                        back (up to float rounding, as in the paper's implementation)
    g = (L+ - L-) / (2ε)           the projected gradient: an estimate of ∇L·z
    θ -= lr · (g z + wd θ)         z regenerated from the same seed; wd = train.weight_decay,
                                   decoupled and on matrices only, as the AdamW path does

No backward pass, no gradients, no optimizer state: memory is that of inference plus one z tensor
at a time (checkpoints have no optimizer.pt). The seed of step t is a function of the run seed and
t only, so a resumed run draws the same z. `train.optimizer`, betas and grad_clip do not apply.

Under DDP the model is not wrapped (no gradients to synchronise): each process computes its share
of L+ and L- on its slice of the global batch, the sums are all-reduced, and every process applies
the same update from the same z, so the replicas stay identical without exchanging weights.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.methods.base import Method


class MezoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-3, gt=0)  # perturbation scale ε


class MeZO(Method):
    name = "mezo"
    Options = MezoOptions
    uses_backward = False

    def prepare(self, model, ctx):
        from tunelab.train.precision import autocast_dtype

        self.seed, self.dist = ctx.seed, ctx.dist
        self.objective = ctx.objective  # the loss of the two forward passes
        self.weight_decay = ctx.recipe.train.weight_decay
        self.autocast = autocast_dtype(ctx.recipe.train.precision)
        # Every parameter is perturbed and updated; none needs autograd (the loop's trainable set is ours).
        self.named = list(model.named_parameters())
        model.requires_grad_(False)
        ctx.log(f"mezo: zeroth-order SGD over {sum(p.numel() for _, p in self.named):,} parameters, "
                f"eps {self.options.eps:g}, weight decay {self.weight_decay:g}")
        return model

    def trainable_params(self, model):
        # Looked up afresh: the loop calls this on the model as placed on the device.
        self.named = list(model.named_parameters())
        return self.named

    def step_seed(self, step: int) -> int:
        from tunelab.train.objectives import sequence_seed

        return sequence_seed(self.seed, step, 3)

    def directions(self, step: int):
        """(parameter, z) for every trained parameter, z drawn afresh from the step's seed each call."""
        import torch

        device = self.named[0][1].device
        gen = torch.Generator(device=device).manual_seed(self.step_seed(step))
        for _, param in self.named:
            yield param, torch.randn(param.shape, generator=gen, device=device, dtype=param.dtype)

    def perturb(self, step: int, scale: float) -> None:
        for param, z in self.directions(step):
            param.add_(z, alpha=scale)

    def global_loss(self, model, batches):
        """Mean loss over the targets of the whole global batch (every process's micro-batches)."""
        import torch

        total = torch.zeros(2, device=batches[0]["input_ids"].device)
        for batch in batches:
            labels = batch["labels"][:, 1:] if self.objective.labels == "clm" else batch["labels"]
            count = (labels != -100).sum()  # a device tensor: no host sync
            with torch.autocast(total.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = self.objective.loss(model, batch)
            total += torch.stack([loss.float() * count, count.float()])
        if self.dist is not None:
            self.dist.all_reduce_sum(total)
        return total[0] / total[1]

    def train_step(self, model, batches, step, lr):
        import torch

        eps = self.options.eps
        device = self.named[0][1].device
        with torch.no_grad():
            # L+ and L- see the same dropout masks: the difference measures the perturbation only.
            rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            self.perturb(step, eps)
            plus = self.global_loss(model, batches)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
            self.perturb(step, -2 * eps)
            minus = self.global_loss(model, batches)
            self.perturb(step, eps)
            grad = (plus - minus) / (2 * eps)  # stays on the device: no host sync
            for param, z in self.directions(step):
                if self.weight_decay and param.ndim >= 2:
                    param.mul_(1 - lr * self.weight_decay)
                param.sub_(z.mul_((lr * grad).to(z.dtype)))  # in place: one z-sized buffer at a time
        return (plus + minus) / 2
