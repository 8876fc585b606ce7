"""Registry of training objectives (what the loss is): name -> "module:Class" implementing objectives/base.py.

An objective is the other axis of a training run beside the method (which weights train): any objective runs
with any method that trains by backward. Adding one = a module + a line here; the shared method suite runs it
with full and lora.
"""

from __future__ import annotations

from tunelab.registry import create, registered_class

OBJECTIVES: dict[str, str] = {
    "clm": "tunelab.objectives.lm:CausalLM",  # next-token prediction (the default for causal LMs)
    "mlm": "tunelab.objectives.lm:MaskedLM",  # BERT's masked-token prediction (the default for encoders)
    # Preference pairs (data format: preference)
    "dpo": "tunelab.objectives.preference:DPO",
    "simpo": "tunelab.objectives.preference:SimPO",
    "orpo": "tunelab.objectives.preference:ORPO",
}


def objective_class(name: str):
    return registered_class(OBJECTIVES, name, "objective.name", "objective")


def create_objective(name: str, options: dict):
    return create(OBJECTIVES, name, options, "objective")


def recorded_objective(recipe: dict) -> tuple[str | None, dict]:
    """(name, options) of the objective a run's config.yaml records: its `objective` section, or the
    spelling of runs written before objectives were their own axis (train.objective, method dpo/simpo/orpo)."""
    section = recipe.get("objective") or {}
    if section.get("name"):
        return section["name"], dict(section.get("options") or {})
    train, method = recipe.get("train") or {}, recipe.get("method") or {}
    if method.get("name") in ("dpo", "simpo", "orpo"):
        return method["name"], {k: v for k, v in (method.get("options") or {}).items() if k != "tuning"}
    options = {k: train[k] for k in ("mlm_probability", "whole_word_masking") if k in train}
    return train.get("objective"), options if train.get("objective") == "mlm" else {}
