"""Stage registry: a stage kind -> "module:function" that runs it.

Training kinds take a validated recipe (`config.RECIPE_KINDS`) and share one set-up
(stages/setup.py) and the one loop (train/loop.py); pretrain and finetune differ only in what
their recipes require. Pipelines (`tunelab run`) and the CLI dispatch through this table, so a new
stage is a module plus a line here and in OUTPUTS (and its recipe class in config.py).
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

# What each kind produces: a model, an adapter, a dataset (data/artifact.py) or an evaluation. In a pipeline
# `${stage}` resolves to it (OUTPUT_PATHS: where it lies in the stage's directory) and is checked against the
# field that names it. A training kind produces an adapter instead when its method saves one (output_type).
OUTPUTS: dict[str, str] = {"pretrain": "model", "finetune": "model", "merge": "model", "prune": "model",
                           "average": "model"}
assert OUTPUTS.keys() == STAGES.keys(), "every stage kind declares its output"
OUTPUT_PATHS = {"model": "final", "adapter": "final", "dataset": "dataset", "evaluation": "eval.json"}


def output_type(kind: str, cfg=None) -> str:
    """What a stage of `kind` running the validated recipe `cfg` produces."""
    from tunelab.config import TrainingRecipe

    if isinstance(cfg, TrainingRecipe) and OUTPUTS[kind] == "model":
        from tunelab.methods import method_class
        from tunelab.methods.peft_base import PeftMethod

        if issubclass(method_class(cfg.method.name), PeftMethod):
            return "adapter"
    return OUTPUTS[kind]


def stage_function(kind: str):
    module, name = STAGES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(cfg, out=None, resume: bool = False, quiet: bool = False):
    """Run a validated recipe as the stage its `kind` names; returns the run directory."""
    return stage_function(cfg.kind)(cfg, out=out, resume=resume, quiet=quiet)
