"""`tunelab anneal RUN --from CHECKPOINT --steps N`: branch a short LR decay off a stable-phase checkpoint.

A WSD or infinite-schedule run keeps its LR at a plateau; any checkpoint of that plateau can become a
release model by decaying the LR for a few steps, while the main run goes on. The branch is a new
run (`RUN-anneal-K` beside RUN) whose recipe is the parent's with:

    init_from: the checkpoint, init_optimizer: true, init_data_state: true  (the same data stream)
    train.max_steps: N
    train.schedule: {name: anneal, start_ratio: the parent's LR multiplier at its last step before K,
                     min_lr_ratio, decay_shape}

So branching at K with N steps reproduces exactly what a WSD run whose decay starts at K would have done
(tested), and `--resume` continues an interrupted branch like any run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tunelab.config import apply_overrides
from tunelab.recipe import validate_recipe
from tunelab.errors import ConfigError, RunDirError


def find_checkpoint(run: Path, name: str) -> Path:
    """`step-300`, `300` or a path -> the intact checkpoint directory, or a one-line error."""
    from tunelab.train import checkpoint as ckpt

    path = Path(name)
    if not path.is_dir():
        step = name.removeprefix("step-")
        path = run / "checkpoints" / f"step-{step}"
    if not path.is_dir():
        kept = ", ".join(p.name for _, p in reversed(ckpt.list_checkpoints(run / "checkpoints"))) or "none"
        raise RunDirError(f"--from: no checkpoint {name!r} in {run / 'checkpoints'} (kept: {kept}; "
                          "train.checkpoint_every and train.keep_checkpoints decide which are kept)")
    problem = ckpt.verify(path)
    if problem:
        raise RunDirError(f"--from: {path} is not an intact checkpoint ({problem}): pick another step")
    return path


def anneal_recipe(run: Path, checkpoint_name: str, steps: int, shape: str | None = None,
                  overrides: list[str] | None = None, log=print):
    """The branch's validated recipe and its default output directory."""
    import json

    from tunelab.config import ScheduleConfig
    from tunelab.train.schedules import lr_multiplier, phase_of

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a tunelab run directory (no config.yaml)")
    if steps < 1:
        raise ConfigError(f"--steps: an anneal needs at least 1 step (got {steps})")
    checkpoint = find_checkpoint(run, checkpoint_name)
    parent = yaml.safe_load((run / "config.yaml").read_text())
    at = json.loads((checkpoint / "state.json").read_text())["step"]
    parent_schedule = ScheduleConfig(**parent["train"]["schedule"])
    # The LR of the last step the parent took before the checkpoint (step K-1): the plateau the decay starts from.
    start = lr_multiplier(max(0, at - 1), parent["train"]["max_steps"], parent_schedule)
    phase = phase_of(max(0, at - 1), parent["train"]["max_steps"], parent_schedule)
    if parent_schedule.name in ("wsd", "infinite", "multi_wsd", "constant") and phase not in ("stable", "constant"):
        log(f"note: step {at} is in the {phase!r} phase of {run}'s {parent_schedule.name} schedule, not its plateau")
    data = copy.deepcopy(parent)
    data["name"] = f"{parent.get('name', run.name)}-anneal-{at}"
    data["init_from"] = str(checkpoint)
    data["init_optimizer"] = (checkpoint / "optimizer.pt").is_file()
    data["init_data_state"] = True
    data["model"]["path"] = None
    data["data"]["mixture_schedule"] = []  # the branch keeps the mixture the parent had reached at step K
    data["train"]["max_steps"] = steps
    data["train"]["eval_at_start"] = True  # the branch point itself: what the anneal gains is measured from it
    data["train"]["schedule"] = {"name": "anneal", "start_ratio": start,
                                 "min_lr_ratio": parent_schedule.min_lr_ratio,
                                 "decay_shape": shape or parent_schedule.decay_shape}
    data = apply_overrides(data, list(overrides or []))
    cfg = validate_recipe(data, f"anneal of {run / 'config.yaml'}", kind=parent.get("kind", "pretrain"))
    return cfg, run.parent / f"{run.name}-anneal-{at}"


def run_anneal(run: Path, checkpoint_name: str, steps: int, shape: str | None = None, out: Path | None = None,
               overrides: list[str] | None = None, resume: bool = False, quiet: bool = False) -> Path:
    from tunelab.stages import run_stage

    log = (lambda *a: None) if quiet else print
    cfg, default_out = anneal_recipe(run, checkpoint_name, steps, shape, overrides, log=log)
    return run_stage(cfg, out=out or default_out, resume=resume, quiet=quiet)
