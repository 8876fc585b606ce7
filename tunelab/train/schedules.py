"""Learning-rate schedules as pure functions: (step, total_steps, cfg) -> multiplier of train.lr.

Pure functions of the step make resume trivial (nothing to save) and tests exact. `step` is 0-based
(the step about to be taken) and `total` is train.max_steps. Every schedule except `anneal` starts
with a linear warmup over `warmup_steps` (step 0 -> 1/warmup, step warmup-1 -> 1).

Decay shapes (cfg.decay_shape), for progress p in [0, 1]; a decay from ratio `hi` to `lo` is
lo + (hi - lo) * shape(p), so p = 1 gives exactly `lo`:
    linear  1 - p
    cosine  0.5 * (1 + cos(pi * p))
    sqrt    1 - sqrt(p)        (the "1-sqrt" cooldown from the WSD literature)
Every decay below takes p = (steps into the decay + 1) / decay length: the first decay step is
already below `hi` (the step before it was the last one at `hi`) and the last one lands on `lo`.

Schedules:
    constant      warmup, then 1.
    linear        warmup, then linear from 1 to min_lr_ratio over the remaining steps.
    cosine        warmup, then cosine from 1 to min_lr_ratio over the remaining steps.
    wsd           warmup, stable at 1, then a decay (decay_shape) to min_lr_ratio over the last
                  max(1, round(decay_fraction * total)) steps.
    inverse_sqrt  warmup, then sqrt(warmup / step), floored at min_lr_ratio.
    infinite      "Beyond Cosine Decay" infinite schedule: warmup, a cosine cooldown from 1 to
                  constant_ratio over cooldown_steps, constant_ratio for as long as the run lasts,
                  and (anneal_steps > 0) a decay (decay_shape) to min_lr_ratio over the last
                  anneal_steps steps of the run.
    multi_wsd     multi-period WSD (as OLMo-core ships it): cfg.periods are consecutive periods,
                  each a WSD of its own: a re-warmup over warmup_steps, stable at 1, a decay
                  (decay_shape) to min_lr_ratio over its last max(1, round(decay_fraction * L))
                  steps. Past the last period: min_lr_ratio.
    anneal        the branch `tunelab anneal` writes: no warmup, a decay (decay_shape) from
                  start_ratio to min_lr_ratio over the whole run.

Phase names (phase_of, for the logs):
    "warmup"    the linear warmup (every schedule but anneal)
    "stable"    held at the peak 1.0 until a planned decay (wsd, multi_wsd)
    "constant"  a flat level with no planned end (constant after warmup; infinite at constant_ratio)
    "cooldown"  infinite's cosine from 1.0 to constant_ratio
    "decay"     a decay to min_lr_ratio (linear, cosine, inverse_sqrt after warmup; wsd, multi_wsd)
    "anneal"    a final decay branch (infinite's last anneal_steps; the whole anneal schedule)
    multi_wsd prefixes the phase with its period, 1-based: "period-2 warmup", "period-2 stable",
    "period-2 decay"; after its last period it is in "end".
"""

from __future__ import annotations

import math

from tunelab.config import ScheduleConfig

# shape(p): 1 at p = 0, 0 at p = 1. Written as "fraction of the drop still to go" so that
# lo + (hi - lo) * shape(1) is exactly lo (the run ends on the floor, bit for bit).
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "sqrt": lambda p: 1.0 - math.sqrt(p),
}


def _decay(hi: float, lo: float, p: float, shape: str) -> float:
    """A decay from `hi` to `lo` at progress p (clamped to [0, 1]: steps past the end stay at `lo`)."""
    p = min(1.0, max(0.0, p))
    return lo + (hi - lo) * DECAY_SHAPES[shape](p)


def _decay_len(fraction: float, n: int) -> int:
    """Steps of a decay taking `fraction` of `n` steps; at least 1, so a decay always reaches its floor."""
    return max(1, round(fraction * n))


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


def _wsd(step: int, total: int, cfg: ScheduleConfig) -> tuple[str, float]:
    w = _warmup(step, cfg)
    if w is not None:
        return "warmup", w
    decay_steps = _decay_len(cfg.decay_fraction, total)
    decay_start = total - decay_steps
    if step < decay_start:
        return "stable", 1.0
    return "decay", _decay(1.0, cfg.min_lr_ratio, (step - decay_start + 1) / decay_steps, cfg.decay_shape)


def wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: hold the peak, then decay (decay_shape) over the last `decay_fraction` of steps.

    The stable phase makes any checkpoint a good branch point for a short decay (MiniCPM, "Scaling
    Laws and Compute-Optimal Training Beyond Fixed Training Durations"): see `anneal`.
    """
    return _wsd(step, total, cfg)[1]


def inverse_sqrt(step: int, total: int, cfg: ScheduleConfig) -> float:
    """1/sqrt(step) decay after warmup (Transformer, T5), equal to 1 at the end of warmup."""
    w = _warmup(step, cfg)
    if w is not None:
        return w
    pivot = max(1, cfg.warmup_steps)
    return max(cfg.min_lr_ratio, math.sqrt(pivot / max(step, pivot)))


def _infinite(step: int, total: int, cfg: ScheduleConfig) -> tuple[str, float]:
    # The config keeps warmup + cooldown + anneal within the run; should they overlap anyway, the
    # warmup wins, then the anneal (the end of the run must reach the floor).
    w = _warmup(step, cfg)
    if w is not None:
        return "warmup", w
    # The anneal is anchored to the end of the run, so extending a run (a larger total) only
    # lengthens the constant phase: every step before the old anneal keeps its value.
    anneal_start = total - cfg.anneal_steps
    if cfg.anneal_steps and step >= anneal_start:
        p = (step - anneal_start + 1) / cfg.anneal_steps
        return "anneal", _decay(cfg.constant_ratio, cfg.min_lr_ratio, p, cfg.decay_shape)
    t = step - cfg.warmup_steps  # steps since the warmup ended
    if t < cfg.cooldown_steps:
        # Always a cosine (the paper's cooldown); decay_shape is for the final anneal.
        return "cooldown", _decay(1.0, cfg.constant_ratio, (t + 1) / cfg.cooldown_steps, "cosine")
    return "constant", cfg.constant_ratio


def infinite(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Infinite LR schedule ("Beyond Cosine Decay"): warmup, cosine cooldown, constant, optional anneal.

    The constant phase has no planned end, so pretraining can go on as data arrives and any of its
    checkpoints can be annealed (here by anneal_steps at the end, or by a `tunelab anneal` branch).
    """
    return _infinite(step, total, cfg)[1]


def _multi_wsd(step: int, total: int, cfg: ScheduleConfig) -> tuple[str, float]:
    offset = 0
    for k, length in enumerate(cfg.periods, start=1):
        if step < offset + length:
            t = step - offset  # local step inside period k
            # Each period re-warms (after its decay the LR is at the floor) like a fresh WSD run.
            if cfg.warmup_steps and t < cfg.warmup_steps:
                return f"period-{k} warmup", (t + 1) / cfg.warmup_steps
            decay_steps = _decay_len(cfg.decay_fraction, length)
            decay_start = length - decay_steps
            if t < decay_start:
                return f"period-{k} stable", 1.0
            p = (t - decay_start + 1) / decay_steps
            return f"period-{k} decay", _decay(1.0, cfg.min_lr_ratio, p, cfg.decay_shape)
        offset += length
    # Past the last period (a run extended beyond its plan): stay where the last decay ended.
    return "end", cfg.min_lr_ratio


def multi_wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multi-period WSD (OLMo-core): consecutive WSD periods of cfg.periods steps, each decayed to the floor.

    Every period ends on an annealed checkpoint (an evaluable model) while training goes on in the
    next one. `total` is unused: the periods (which the config makes sum to max_steps) set the shape.
    """
    return _multi_wsd(step, total, cfg)[1]


def anneal(step: int, total: int, cfg: ScheduleConfig) -> float:
    """The decay branch of a stable-phase checkpoint: start_ratio -> min_lr_ratio over `total` steps.

    No warmup: the branch continues a run already at start_ratio. With p = (step + 1) / total it
    reproduces the parent's own decay: branching a `wsd` run at K (start_ratio 1) with N steps gives,
    at branch step j, the parent's value at step K + j for a decay that starts at K and lasts N.
    """
    return _decay(cfg.start_ratio, cfg.min_lr_ratio, (step + 1) / max(1, total), cfg.decay_shape)


SCHEDULES = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "wsd": wsd,
    "inverse_sqrt": inverse_sqrt,
    "infinite": infinite,
    "multi_wsd": multi_wsd,
    "anneal": anneal,
}


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    return SCHEDULES[cfg.name](step, total, cfg)


def phase_of(step: int, total: int, cfg: ScheduleConfig) -> str:
    """The phase `step` falls in (names in the module docstring), for the logs.

    The multi-phase schedules take it from the same code that computes their value, so the two
    cannot disagree on a boundary.
    """
    if cfg.name == "anneal":
        return "anneal"
    if cfg.name == "infinite":
        return _infinite(step, total, cfg)[0]
    if cfg.name == "multi_wsd":
        return _multi_wsd(step, total, cfg)[0]
    if cfg.name == "wsd":
        return _wsd(step, total, cfg)[0]
    if _warmup(step, cfg) is not None:
        return "warmup"
    if cfg.name == "constant":
        return "constant"
    return "decay"  # linear, cosine, inverse_sqrt


def _g(x: float) -> str:
    return f"{x:g}"


def describe(cfg: ScheduleConfig, total: int) -> str:
    """One line for the log, e.g. "infinite: warmup 0->1 over 20 steps, cosine cooldown to 0.25 over 100,
    constant, anneal to 0.1 over 30 (linear)"."""
    name, lo = cfg.name, _g(cfg.min_lr_ratio)
    if name == "anneal":
        return f"anneal: {cfg.decay_shape} decay from {_g(cfg.start_ratio)} to {lo} over {total} steps, no warmup"
    parts = [f"warmup 0->1 over {cfg.warmup_steps} steps"] if cfg.warmup_steps else []
    after = max(0, total - cfg.warmup_steps)
    if name == "constant":
        parts.append("constant 1")
    elif name in ("linear", "cosine"):
        parts.append(f"{name} decay to {lo} over {after}" if after else "no decay")
    elif name == "inverse_sqrt":
        parts.append(f"1/sqrt(step) decay, floor {lo}")
    elif name == "wsd":
        decay_steps = _decay_len(cfg.decay_fraction, total)
        parts.append(f"stable for {max(0, total - decay_steps - cfg.warmup_steps)}")
        parts.append(f"{cfg.decay_shape} decay to {lo} over {decay_steps}")
    elif name == "infinite":
        if cfg.cooldown_steps:
            parts.append(f"cosine cooldown to {_g(cfg.constant_ratio)} over {cfg.cooldown_steps}")
        parts.append("constant" if cfg.cooldown_steps else f"constant {_g(cfg.constant_ratio)}")
        if cfg.anneal_steps:
            parts.append(f"anneal to {lo} over {cfg.anneal_steps} ({cfg.decay_shape})")
    elif name == "multi_wsd":
        lengths = "+".join(str(n) for n in cfg.periods)
        decays = "/".join(str(_decay_len(cfg.decay_fraction, n)) for n in cfg.periods)
        each = [f"warmup over {cfg.warmup_steps}"] if cfg.warmup_steps else []
        each += ["stable", f"{cfg.decay_shape} decay to {lo} over {decays}"]
        parts = [f"{len(cfg.periods)} periods ({lengths} steps), each: " + ", ".join(each)]
    return f"{name}: " + ", ".join(parts)


def warning(cfg: ScheduleConfig, total: int) -> str | None:
    """One line when the warmup leaves no room for the schedule (e.g. 20 warmup steps in a 20-step run:
    the LR peaks at the last step). Warned, not scaled: the recipe's warmup_steps mean what they say,
    and a resumed run with a longer train.max_steps keeps the same warmup."""
    if cfg.name in ("anneal", "multi_wsd") or not cfg.warmup_steps:  # multi_wsd: checked per period in the config
        return None
    if cfg.warmup_steps >= total:
        return (f"warning: train.schedule.warmup_steps={cfg.warmup_steps} is the whole run (train.max_steps={total}): "
                "the LR rises until the last step and never reaches its planned schedule; lower warmup_steps")
    if cfg.name == "wsd" and cfg.warmup_steps + _decay_len(cfg.decay_fraction, total) > total:
        return (f"warning: train.schedule.warmup_steps={cfg.warmup_steps} overlaps the wsd decay (its last "
                f"{_decay_len(cfg.decay_fraction, total)} of {total} steps): the decay starts before the warmup ends")
    return None
