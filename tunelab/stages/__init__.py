"""Stage registry: a stage kind -> "module:function" that runs it.

Training kinds take a validated recipe (`config.RECIPE_KINDS`) and share one set-up
(stages/setup.py) and the one loop (train/loop.py); pretrain and finetune differ only in what
their recipes require. Pipelines (`tunelab run`) and the CLI dispatch through this table, so a new
stage is a module plus a line here (and its recipe class in config.py).
"""

from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "pretrain": "tunelab.stages.train:run_training",
    "finetune": "tunelab.stages.train:run_training",
    "merge": "tunelab.stages.merge:run_merge",
    "prune": "tunelab.stages.prune:run_prune",
    "average": "tunelab.stages.average:run_average",
}


def stage_function(kind: str):
    module, name = STAGES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(cfg, out=None, resume: bool = False, quiet: bool = False):
    """Run a validated recipe as the stage its `kind` names; returns the run directory."""
    return stage_function(cfg.kind)(cfg, out=out, resume=resume, quiet=quiet)
