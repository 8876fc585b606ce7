"""Optimizers and parameter groups, nothing hidden.

Weight decay applies to matrices only: decaying biases, norms' gains and (with tied weights,
unavoidably) nothing else is the GPT-2/nanoGPT convention.
"""

from __future__ import annotations

import torch



def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups of (name, parameter): torch then keeps the names in the optimizer's state_dict
    ("param_names"), which lets init_optimizer carry moments by name into another trainable set."""
    decay = [(n, p) for n, p in named_params if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named_params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], cfg) -> torch.optim.Optimizer:
    groups = param_groups(named_params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # fused=True runs one kernel over all tensors (CPU and CUDA in torch >= 2.4): fewer passes over memory.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Moments of parameters trainable before and after a change of the trainable set carry over;
    parameters just frozen drop theirs (LISA keeps no optimizer state for frozen layers)."""
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
