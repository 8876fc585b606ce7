"""Recipes of model operations (merge, prune, average): saved models in, a model directory out, no training loop.

Their sections differ from a training recipe's, so they are validated by their class alone
(`validate(data, source, MergeRecipe)`); validate_recipe skips the training-method check for them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config.base import Section, did_you_mean
from tunelab.config.training import SourceSpec, _as_source_list


# method -> the options it reads (anything else set is an error) and its defaults.
MERGE_METHODS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},  # a weighted mean of the models; no weights: the uniform soup
    "greedy_soup": {},  # inputs by held-out loss; each joins the uniform soup only if it lowers the loss
    "task_arithmetic": {"scale": 1.0, "normalize": False},  # base + scale * sum_i w_i (model_i - base)
    "ties": {"density": 0.5, "scale": 1.0, "normalize": False, "majority_sign": "total"},
    "dare_linear": {"density": 0.5, "scale": 1.0, "normalize": False, "seed": 0},
    "dare_ties": {"density": 0.5, "scale": 1.0, "normalize": False, "seed": 0, "majority_sign": "total"},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01, "scale": 1.0, "normalize": False},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01, "scale": 1.0, "normalize": False, "majority_sign": "total"},
    "slerp": {"t": 0.5, "epsilon": 1e-4},  # exactly two models
}
MERGE_NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


class MergeInput(Section):
    path: str  # a model directory, a tunelab run (its final/) or a LoRA adapter (merged onto its base first)
    weight: float | None = None  # unset for every model: 1 each (linear: the uniform mean)


class MergeOptions(Section):
    density: float | None = Field(None, gt=0, le=1)  # share of each task vector kept (ties, dare, breadcrumbs)
    gamma: float | None = Field(None, ge=0, lt=1)  # breadcrumbs: share of the largest |deltas| dropped too
    scale: float | None = None  # lambda: how much of the merged task vector is added to the base
    normalize: bool | None = None  # divide the weights by their sum first
    seed: int | None = None  # dare: the drop masks (deterministic per tensor name)
    majority_sign: Literal["total", "frequency"] | None = None  # ties: elect the sign by summed delta or by count
    t: float | None = Field(None, ge=0, le=1)  # slerp: 0 = the first model, 1 = the second
    epsilon: float | None = Field(None, gt=0, lt=1)  # slerp: |cos| > 1 - epsilon counts as colinear (lerp)


class MergeEval(Section):
    """What a model operation scores every model on, before and after (eval.scoring.Scorer)."""
    # null: the sources the inputs and their ancestors trained on (lineage.json), else the built-in domains;
    # []: no evaluation. A source an input trained on is scored on the held-out split its training used,
    # any other whole (as `tunelab eval` does).
    data: list[SourceSpec] | None = None
    seq_len: int = Field(256, ge=8)
    max_tokens: int | None = Field(32768, ge=1)  # per domain and model
    eval_fraction: float | None = Field(None, gt=0, lt=0.5)  # null: the one each source's training held out
    select: Literal["worst", "mean"] = "worst"  # what greedy_soup and sweep minimise: worst-domain or mean loss

    _to_list = field_validator("data", mode="before")(lambda v: None if v is None else _as_source_list(v))


class MergeSweep(Section):
    """Candidates to merge and score; only the best (by eval.select) is kept."""
    weights: list[list[float]] | None = None
    density: list[float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "MergeSweep":
        if (self.weights is None) == (self.density is None):
            raise ValueError("give exactly one of sweep.weights (a list of weight lists) or sweep.density (a list)")
        values = self.weights if self.weights is not None else self.density
        if not values:
            raise ValueError("list at least one candidate")
        bad = [d for d in (self.density or []) if not 0 < d <= 1]
        if bad:
            raise ValueError(f"density must be in (0, 1] (got {bad[0]})")
        return self


class MergeRecipe(Section):
    """kind: merge: two or more saved models in, one HF model directory out (with lineage and scores)."""
    kind: Literal["merge"] = "merge"
    name: str = "merge"
    models: list[MergeInput]
    base: str | None = None  # the model the inputs were fine-tuned from (delta methods need it)
    method: str = "linear"
    options: MergeOptions = Field(default_factory=MergeOptions)
    eval: MergeEval = Field(default_factory=MergeEval)
    sweep: MergeSweep | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:  # `models: [runs/a, runs/b]` is short for [{path: runs/a}, ...]
        if isinstance(v, str):
            v = [v]
        return [{"path": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _cross_checks(self) -> "MergeRecipe":
        method, n = self.method, len(self.models)
        if method not in MERGE_METHODS:
            raise ValueError(f"method: unknown merge method {method!r}{did_you_mean(method, MERGE_METHODS)}; "
                             f"known: {', '.join(MERGE_METHODS)}")
        allowed = MERGE_METHODS[method]
        for key in sorted(self.options.model_fields_set):
            if key not in allowed and getattr(self.options, key) is not None:
                uses = ", ".join(allowed) or "no options"
                raise ValueError(f"options.{key}: not used by method {method} (it uses {uses})")
        for key, default in allowed.items():  # the resolved recipe names every value used
            if getattr(self.options, key) is None:
                setattr(self.options, key, default)
        if method == "slerp" and n != 2:
            raise ValueError(f"models: slerp interpolates between exactly two models (got {n}); use linear, ties "
                             "or another method for more")
        least = 1 if method in MERGE_NEEDS_BASE else 2
        if n < least:
            raise ValueError(f"models: method {method} needs at least {least} models (got {n})")
        if method in MERGE_NEEDS_BASE and not self.base:
            raise ValueError(f"base: method {method} merges task vectors (model - base): set base to the model "
                             "the inputs were fine-tuned from")
        if method not in MERGE_NEEDS_BASE and self.base:
            raise ValueError(f"base: method {method} does not use a base; remove it, or use a delta method "
                             f"({', '.join(MERGE_NEEDS_BASE)})")
        given = [m.weight for m in self.models if m.weight is not None]
        if given and len(given) != n:
            raise ValueError(f"models: give a weight for every model or for none ({len(given)} of {n} have one)")
        if given and method in ("slerp", "greedy_soup"):
            raise ValueError(f"models: method {method} takes no weights"
                             + (" (options.t sets the mix)" if method == "slerp" else " (the soup is uniform)"))
        if given and not any(w != 0 for w in given):
            raise ValueError("models: the weights are all 0")
        if given and self.options.normalize and sum(given) == 0:
            raise ValueError("models: the weights add up to 0, so they cannot be normalized (options.normalize)")
        if (self.options.density or 1) + (self.options.gamma or 0) > 1:
            raise ValueError(f"options: density + gamma must be at most 1 (got {self.options.density} + "
                             f"{self.options.gamma}): breadcrumbs keeps `density` of each tensor below the "
                             "`gamma` share of largest deltas")
        scored = self.eval.data is None or bool(self.eval.data)
        if method == "greedy_soup" and not scored:
            raise ValueError("eval.data: greedy_soup decides by held-out loss: give sources (or leave it unset)")
        if self.sweep is not None:
            if not scored:
                raise ValueError("eval.data: a sweep picks by held-out loss: give sources (or leave it unset)")
            if method in ("greedy_soup", "slerp") and self.sweep.weights is not None:
                raise ValueError(f"sweep.weights: method {method} takes no weights")
            if self.sweep.density is not None and "density" not in allowed:
                raise ValueError(f"sweep.density: method {method} has no density")
            for i, weights in enumerate(self.sweep.weights or []):
                if len(weights) != n:
                    raise ValueError(f"sweep.weights.{i}: {len(weights)} weights for {n} models")
                if not any(w != 0 for w in weights) or (self.options.normalize and sum(weights) == 0):
                    raise ValueError(f"sweep.weights.{i}: the weights are all 0 (or add up to 0)")
            bad = [d for d in (self.sweep.density or []) if d + (self.options.gamma or 0) > 1]
            if bad:
                raise ValueError(f"sweep.density: {bad[0]} + gamma {self.options.gamma} is more than 1")
        return self

    @staticmethod
    def expand_shorthands(data: dict) -> dict:
        """`models: [runs/a, runs/b]` -> [{path: runs/a}, ...] before --set, so `--set models.0.weight=2` can index it."""
        if isinstance(data.get("models"), list):
            data["models"] = [{"path": m} if isinstance(m, str) else m for m in data["models"]]
        if isinstance(data.get("eval"), dict) and isinstance(data["eval"].get("data"), (str, list)):
            data["eval"]["data"] = _as_source_list(data["eval"]["data"])
        return data

    def model_paths(self) -> list[str]:
        """Every model the merge reads (pipelines hash those from outside the pipeline)."""
        return [m.path for m in self.models] + ([self.base] if self.base else [])

    def data_sources(self) -> list[SourceSpec]:
        return list(self.eval.data or [])


# ---------------------------------------------------------------- prune recipes (kind: prune)

UNSTRUCTURED = ("magnitude", "wanda")  # zero single weights; masks keep them 0 in later training
STRUCTURED = ("heads", "ffn", "layers")  # remove whole units: a smaller HF model
PRUNE_METHODS = (*UNSTRUCTURED, *STRUCTURED, "imp")  # imp: iterative magnitude pruning with rewinding


class Calibration(Section):
    """Text the pruning criterion reads (wanda; structured pruning with criterion: loss)."""
    # null: the sources the model (and its ancestors) trained on, else builtin:prose; always their training
    # split, so the held-out split the evaluation scores stays unseen.
    data: list[SourceSpec] | None = None
    seq_len: int = Field(128, ge=8)
    max_tokens: int = Field(16384, ge=8)

    _to_list = field_validator("data", mode="before")(lambda v: None if v is None else _as_source_list(v))


class Lottery(Section):
    """method: imp. Train, prune `rate` of the remaining weights, rewind the survivors, repeat."""
    train: str  # a training recipe (path or shipped name): the dense network and how every round trains
    rounds: int = Field(3, ge=1, le=50)
    rewind: str = "init"  # init (the weights before training) or step-K (a checkpoint of the dense run)
    random_ticket: bool = False  # also train the final round's per-layer sparsity with a random mask
    set: list[str] = Field(default_factory=list)  # --set style overrides of the training recipe

    @field_validator("rewind")
    @classmethod
    def _rewind(cls, v: str) -> str:
        if v != "init" and not (v.startswith("step-") and v[5:].isdigit() and int(v[5:]) > 0):
            raise ValueError(f"{v!r}: give init or step-K (K > 0: a step of the dense run, e.g. step-20)")
        return v


class PruneRecipe(Section):
    """kind: prune: a saved model in, a pruned HF model directory out (with masks, a sparsity report,
    size / speed / quality before and after, and lineage)."""
    kind: Literal["prune"] = "prune"
    name: str = "prune"
    model: str | None = None  # a model directory, a tunelab run (its final/) or package:NAME (not for imp)
    method: str = "magnitude"
    sparsity: float | None = None  # share pruned: of the weights (unstructured, imp), of the units (structured)
    count: int | None = Field(None, ge=1)  # structured: heads / neurons per layer, or layers, to remove
    scope: Literal["layer", "global", "row"] | None = None  # magnitude: layer (default) | global; wanda: row
    targets: list[str] | None = None  # regexes of weight names to prune; null: the blocks' linear layers
    criterion: Literal["magnitude", "loss"] = "magnitude"  # structured: weight norms, or calibration loss
    calibration: Calibration = Field(default_factory=Calibration)
    eval: MergeEval = Field(default_factory=MergeEval)  # before/after scores
    lottery: Lottery | None = None
    seed: int = 0  # the random ticket's mask

    @model_validator(mode="after")
    def _cross_checks(self) -> "PruneRecipe":
        m = self.method
        if m not in PRUNE_METHODS:
            raise ValueError(f"method: unknown pruning method {m!r}{did_you_mean(m, PRUNE_METHODS)}; "
                             f"known: {', '.join(PRUNE_METHODS)}")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity: {self.sparsity} is outside [0, 1); give the share to prune, e.g. 0.5")
        if m == "imp":
            if self.lottery is None:
                raise ValueError("lottery: method imp needs lottery.train (a training recipe) and lottery.rounds")
            if self.model is not None:
                raise ValueError("model: method imp trains its own dense model from lottery.train; remove model")
        elif self.lottery is not None:
            raise ValueError(f"lottery: only method imp uses it (this is {m})")
        elif self.model is None:
            raise ValueError("model: give the model to prune (a model directory, a run, or package:NAME)")
        if m in STRUCTURED:
            if (self.sparsity is None) == (self.count is None):
                raise ValueError(f"sparsity: method {m} removes either a share (sparsity) or a number (count) of "
                                 "units: give exactly one")
            if self.scope is not None or self.targets is not None:
                raise ValueError(f"{'scope' if self.scope else 'targets'}: method {m} removes whole units "
                                 "(no scope or targets)")
        else:
            if self.count is not None:
                raise ValueError(f"count: method {m} prunes single weights; use sparsity (count is for heads, ffn, "
                                 "layers)")
            if self.sparsity is None:
                raise ValueError(f"sparsity: method {m} needs the share of weights to prune (e.g. 0.5)")
            if self.criterion != "magnitude":
                raise ValueError(f"criterion: method {m} has its own criterion (criterion is for heads, ffn, layers)")
            allowed = {"magnitude": ("layer", "global"), "imp": ("layer", "global"), "wanda": ("row", "layer")}[m]
            if self.scope is None:
                self.scope = allowed[0]
            elif self.scope not in allowed:
                raise ValueError(f"scope: method {m} prunes per {' or '.join(allowed)} (got {self.scope})")
        return self

    @staticmethod
    def expand_shorthands(data: dict) -> dict:
        for section in ("eval", "calibration"):
            if isinstance(data.get(section), dict) and isinstance(data[section].get("data"), (str, list)):
                data[section]["data"] = _as_source_list(data[section]["data"])
        return data

    def model_paths(self) -> list[str]:
        return [self.model] if self.model else []

    def data_sources(self) -> list[SourceSpec]:
        return list(self.eval.data or []) + list(self.calibration.data or [])


# ---------------------------------------------------------------- average recipes (kind: average)


class AverageRecipe(Section):
    """kind: average: the uniform mean of a run's checkpoints (LAWA), one HF model directory out."""
    kind: Literal["average"] = "average"
    name: str = "average"
    run: str  # a run directory with checkpoints/ (or its final/, as ${stage} gives it in a pipeline)
    last: int | None = Field(None, ge=1)  # the newest K intact checkpoints (default 3)
    steps: list[int] | None = None  # exactly these checkpoint steps
    eval: MergeEval = Field(default_factory=lambda: MergeEval(data=[]))  # off unless sources are given

    @model_validator(mode="after")
    def _one(self) -> "AverageRecipe":
        if self.last is not None and self.steps is not None:
            raise ValueError("last and steps: give one of them, not both")
        if self.steps is not None and not self.steps:
            raise ValueError("steps: give at least one step, e.g. [200, 300, 400]")
        return self

    def model_paths(self) -> list[str]:
        return [self.run]

    def data_sources(self) -> list[SourceSpec]:
        return list(self.eval.data or [])
