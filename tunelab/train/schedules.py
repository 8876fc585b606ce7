"""Learning-rate schedules as pure functions: (step, total_steps, cfg) -> multiplier of train.lr.

Pure functions of the step make resume trivial (nothing to save) and tests exact.
Every schedule starts with a linear warmup over `warmup_steps` (step 0 -> 1/warmup).
"""

from __future__ import annotations

import math

from tunelab.config import ScheduleConfig


def _warmup(step: int, cfg: ScheduleConfig) -> float | None:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return None


def _progress(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Fraction of the post-warmup steps done, in [0, 1]."""
    span = max(1, total - cfg.warmup_steps - 1)
    return min(1.0, max(0.0, (step - cfg.warmup_steps) / span))


def constant(step: int, total: int, cfg: ScheduleConfig) -> float:
    return _warmup(step, cfg) or 1.0


def linear(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    return 1.0 - (1.0 - cfg.min_lr_ratio) * _progress(step, total, cfg)


def cosine(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    p = _progress(step, total, cfg)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: hold the peak, then decay linearly over the last `decay_fraction` of steps.

    The stable phase makes any checkpoint a good branch point for a short decay (MiniCPM, "Scaling
    Laws and Compute-Optimal Training Beyond Fixed Training Durations").
    """
    w = _warmup(step, cfg)
    if w is not None:
        return w
    decay_steps = max(1, round(cfg.decay_fraction * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - cfg.min_lr_ratio) * p


def inverse_sqrt(step: int, total: int, cfg: ScheduleConfig) -> float:
    """1/sqrt(step) decay after warmup (Transformer, T5), equal to 1 at the end of warmup."""
    w = _warmup(step, cfg)
    if w is not None:
        return w
    pivot = max(1, cfg.warmup_steps)
    return max(cfg.min_lr_ratio, math.sqrt(pivot / max(step, pivot)))


SCHEDULES = {"constant": constant, "linear": linear, "cosine": cosine, "wsd": wsd, "inverse_sqrt": inverse_sqrt}


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    return SCHEDULES[cfg.name](step, total, cfg)
