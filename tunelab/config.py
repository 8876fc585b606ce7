"""Recipe schema: every section of a YAML recipe, with its defaults, validated before any work.

This is the only place defaults live. A key in YAML maps 1:1 to a field here; grep the field
name to find the line that uses it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError


class Section(BaseModel):
    # Unknown keys are errors (typos must not silently fall back to defaults).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    preset: str | None = "llama-tiny"  # a name from models.PRESETS, used when `path` is unset
    path: str | None = None  # local directory or hub id of a pretrained model to start from
    overrides: dict[str, Any] = Field(default_factory=dict)  # HF config fields changed on a preset
    attn_implementation: str = "sdpa"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.path is None and self.preset is None:
            raise ValueError("set model.preset (a tiny architecture) or model.path (a saved model)")
        return self


class TokenizerConfig(Section):
    path: str | None = None  # load from here; unset: the model's own tokenizer, or train one
    vocab_size: int = Field(4096, ge=300)  # byte-level BPE: 256 bytes + specials + merges
    train_bytes: int = Field(8_000_000, gt=0)  # how much of the training text the BPE sees
    min_frequency: int = Field(2, ge=1)


class SourceSpec(Section):
    source: str  # builtin:prose|code|tests, a .txt/.jsonl/.parquet file, a folder, or hf:<dir>
    weight: float = Field(1.0, gt=0)
    name: str | None = None  # domain name in metrics; default derived from the source
    text_field: str = "text"  # jsonl / parquet / HF datasets column holding the text
    split: str = "train"  # HF datasets split

    @property
    def domain(self) -> str:
        if self.name:
            return self.name
        if self.source.startswith("builtin:"):
            return self.source.split(":", 1)[1]
        return Path(self.source.removeprefix("hf:").rstrip("/")).stem or self.source


def _as_source_list(value: Any) -> Any:
    # `data.train=PATH` on the command line gives a bare string: one source, weight 1.
    if isinstance(value, str):
        return [{"source": value}]
    if isinstance(value, list):
        return [{"source": v} if isinstance(v, str) else v for v in value]
    return value


class ReplayConfig(Section):
    """Old-domain text mixed into every global batch of a continued run (forgetting's cheapest cure)."""
    # Empty: the training sources of the starting model's ancestors, read from their lineage.json.
    sources: list[SourceSpec] = Field(default_factory=list)
    fraction: float = Field(0.05, gt=0, lt=1)  # share of each global batch's sequences (= tokens)

    _to_list = field_validator("sources", mode="before")(_as_source_list)


class MixturePhase(Section):
    """From `at` (a fraction of train.max_steps) on, these domains get these weights; others keep theirs."""
    at: float = Field(gt=0, lt=1)
    weights: dict[str, float]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("name at least one domain and its weight")
        bad = {k: w for k, w in v.items() if not w >= 0}
        if bad:
            raise ValueError(f"weights must be >= 0 (got {bad})")
        return v


class DataConfig(Section):
    train: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(source="builtin:prose")])
    # Extra eval-only domains; each training source's held-out split is always evaluated too.
    eval: list[SourceSpec] = Field(default_factory=list)
    seq_len: int = Field(256, ge=8)
    # concat: documents joined with EOS, attention crosses boundaries (classic GPT packing).
    # document: same packing, but position ids restart per document so attention stays inside it.
    packing: Literal["concat", "document"] = "concat"
    eval_fraction: float = Field(0.02, gt=0, lt=0.5)
    cache_dir: str | None = None  # default: $TUNELAB_CACHE or ~/.cache/tunelab
    replay: ReplayConfig | None = None
    # Weights that change during training (e.g. upsample the target domain in the last 10%), in order of `at`.
    mixture_schedule: list[MixturePhase] = Field(default_factory=list)
    # A continued run also scores the domains its starting model's ancestors trained on (held-out split),
    # so forgetting is tracked without listing the old data in data.eval.
    eval_ancestors: bool = True

    _to_list = field_validator("train", "eval", mode="before")(_as_source_list)

    @field_validator("train")
    @classmethod
    def _not_empty(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("needs at least one source")
        return v


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "wsd", "inverse_sqrt", "infinite", "multi_wsd", "anneal"] = "cosine"
    warmup_steps: int = Field(0, ge=0)  # multi_wsd: the re-warmup at the start of every period
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # floor of the decay, as a fraction of lr
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd, multi_wsd: share of (each period's) steps spent decaying
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd, multi_wsd, infinite's anneal, anneal
    # infinite ("Beyond Cosine Decay"): warmup, cosine cooldown to constant_ratio over cooldown_steps, a constant
    # phase that can go on indefinitely, and (anneal_steps > 0) an anneal to min_lr_ratio in the last steps.
    cooldown_steps: int = Field(0, ge=0)
    constant_ratio: float = Field(0.25, gt=0, le=1)
    anneal_steps: int = Field(0, ge=0)
    periods: list[int] = Field(default_factory=list)  # multi_wsd: length in steps of each period, summing to max_steps
    start_ratio: float = Field(1.0, gt=0, le=1)  # anneal: the multiplier it decays from (written by `tunelab anneal`)


class TrainConfig(Section):
    objective: Literal["clm", "mlm"] = "clm"
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_masking: bool = False  # mlm: mask every token of a chosen word together
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward pass, per process
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(0.1, ge=0)
    momentum: float = Field(0.9, ge=0)  # sgd only
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # auto: bf16 where the device runs it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32.
    # The run's config.yaml holds the precision actually used (train/precision.py decides).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    # Evaluate before the first step: the baseline that forgetting and gains are measured from.
    # Unset: yes when the run starts from a trained model (model.path or init_from), no for a fresh one.
    eval_at_start: bool | None = None
    eval_max_tokens: int = Field(32768, ge=1)  # per domain, per evaluation during training
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)


class MethodConfig(Section):
    name: str = "full"  # a key of methods.METHODS
    options: dict[str, Any] = Field(default_factory=dict)  # method-specific, validated by the method


class TrainingRecipe(Section):
    """The sections every training stage shares; each kind below adds its own rules."""
    name: str = "run"
    # Continue from a tunelab run (its final/, else its newest checkpoint) or one of its checkpoints/step-N:
    # a new run with those weights, a fresh schedule and a fresh data state (--resume is for the same run).
    init_from: str | None = None
    init_optimizer: bool = False  # also carry the optimizer moments (needs a checkpoint with optimizer.pt)
    init_data_state: bool = False  # also continue its data stream (anneal branches; needs the same data)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainingRecipe":
        from tunelab.models import PRESETS  # a table of names and HF config fields: imports no torch

        if self.model.path is None and self.model.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.model.preset!r}"
                             f"{did_you_mean(self.model.preset, PRESETS)}; known: {', '.join(PRESETS)}")
        eval_names = [s.domain for s in self.data.eval]
        clash = set(eval_names) & {s.domain for s in self.data.train}
        if clash:  # an eval-only source would silently shadow (or be shadowed by) a training domain
            raise ValueError(f"data.eval: domain {sorted(clash)[0]!r} is also a training source; a training "
                             "source is always scored on its held-out split: remove it from data.eval or give it "
                             "another name")
        dupes = sorted({n for n in eval_names if eval_names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.eval: two sources named {dupes[0]!r}: give one a name")
        if self.init_from is not None and self.model.path is not None:
            raise ValueError("init_from: set either init_from (a tunelab run or checkpoint) or model.path (a model "
                             "directory), not both")
        if self.train.whole_word_masking and self.train.objective != "mlm":
            raise ValueError("train.whole_word_masking: only for train.objective: mlm (a causal LM masks nothing)")
        if (self.init_optimizer or self.init_data_state) and self.init_from is None:
            raise ValueError("init_from: init_optimizer / init_data_state carry state from a run: set init_from "
                             "to that run or one of its checkpoints")
        self._check_data_extras()
        self._check_schedule()
        return self

    def _check_data_extras(self) -> None:
        domains = [s.domain for s in self.data.train]
        replay = self.data.replay
        if replay is not None:
            if not replay.sources and self.init_from is None and self.model.path is None:
                raise ValueError("data.replay.sources: empty means 'the old data of the starting model', but this "
                                 "run starts from scratch: list the sources to replay")
            clash = set(domains) & {s.domain for s in replay.sources}
            if clash:
                raise ValueError(f"data.replay.sources: {sorted(clash)[0]!r} is also a training source: replay is "
                                 "for old data; raise its weight in data.train instead")
        last = 0.0
        for i, phase in enumerate(self.data.mixture_schedule):
            if phase.at <= last:
                raise ValueError(f"data.mixture_schedule.{i}.at: phases must be in increasing order of `at` "
                                 f"(got {phase.at} after {last})")
            last = phase.at
            unknown = [d for d in phase.weights if d not in domains]
            if unknown:
                raise ValueError(f"data.mixture_schedule.{i}.weights: {unknown[0]!r} is not a training domain"
                                 f"{did_you_mean(unknown[0], domains)}; domains: {', '.join(domains)}")
            weights = {d: s.weight for d, s in zip(domains, self.data.train)} | phase.weights
            if not any(w > 0 for w in weights.values()):
                raise ValueError(f"data.mixture_schedule.{i}.weights: at least one domain needs a weight > 0")

    def _check_schedule(self) -> None:
        """Phases that do not fit in train.max_steps are errors now, not a surprising LR curve later."""
        s, steps = self.train.schedule, self.train.max_steps
        where = "train.schedule"
        if s.name == "multi_wsd":
            if not s.periods:
                raise ValueError(f"{where}.periods: multi_wsd needs the length of each period, e.g. [600, 400]")
            if sum(s.periods) != steps or min(s.periods) < 1:
                raise ValueError(f"{where}.periods: the periods ({'+'.join(map(str, s.periods))} = {sum(s.periods)} "
                                 f"steps) must be positive and add up to train.max_steps ({steps})")
            short = [p for p in s.periods if p <= s.warmup_steps]
            if short:
                raise ValueError(f"{where}.warmup_steps: {s.warmup_steps} does not fit in a period of {short[0]} steps")
            return
        if s.periods:
            raise ValueError(f"{where}.periods: only used by name: multi_wsd (this schedule is {s.name!r})")
        # A warmup longer than the run is allowed (short test runs); an infinite schedule's phases must fit.
        fixed = s.warmup_steps + s.cooldown_steps + s.anneal_steps
        if s.name == "infinite" and fixed > steps:
            raise ValueError(f"{where}: its phases (warmup {s.warmup_steps} + cooldown {s.cooldown_steps} + anneal "
                             f"{s.anneal_steps} = {fixed} steps) do not fit in train.max_steps ({steps}); shorten "
                             "them or train longer")
        if s.name != "infinite" and (s.cooldown_steps or s.anneal_steps):
            raise ValueError(f"{where}: cooldown_steps/anneal_steps belong to name: infinite (this schedule is {s.name!r})")


class PretrainRecipe(TrainingRecipe):
    """Pretraining or continued pretraining: any model (a preset or model.path), any method."""
    kind: Literal["pretrain"] = "pretrain"


class FinetuneRecipe(TrainingRecipe):
    """Fine-tuning a trained model: model.path is required; the method defaults to LoRA."""
    kind: Literal["finetune"] = "finetune"
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="lora"))

    @model_validator(mode="before")
    @classmethod
    def _lora_by_default(cls, data: Any) -> Any:
        # `method.options` given without `method.name` are LoRA's options here, not full's.
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {**data["method"], "name": "lora"}}
        return data

    @model_validator(mode="after")
    def _needs_a_trained_model(self) -> "FinetuneRecipe":
        if self.model.path is None and self.init_from is None:
            raise ValueError("model.path: a finetune starts from a trained model: set model.path "
                             "(e.g. runs/quickstart/final, or --set model.path=DIR) or init_from (a run)")
        return self


# The recipe is a union discriminated by `kind`: validate_recipe picks the class from this table, so
# each kind validates its own sections. Later kinds (distill, merge, prune, ...) join it.
RECIPE_KINDS: dict[str, type[Section]] = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}
RecipeConfig = TrainingRecipe  # the type every training recipe has (for annotations)


# ---------------------------------------------------------------- loading and overrides


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as YAML 1.2 and every user do (YAML 1.1 needs `1.0e-5`).

    Typed fields would coerce the string anyway, but untyped ones (model.overrides,
    method.options) would pass "1e-5" on to transformers as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:i])} is not a section")
            node = node.setdefault(part, {})
            if node is None:
                node = {}
        last = path[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is not a section")
    return data


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for did-you-mean hints)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        hint = did_you_mean(loc[-1], owner.model_fields) if owner else ""
        msg = f"unknown key{hint}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more else ""
    return f"{source}: {path}: {msg}{tail}" if loc else f"{source}: {msg}{tail}"


def validate(data: dict, source: str, cls: type[BaseModel]):
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls)) from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe not found (give a path to a YAML file or a shipped recipe name)")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping of sections (model, data, train, ...)")
    return data


RECIPES_DIR = Path(__file__).parent / "recipes"


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (`quickstart`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such recipe file{did_you_mean(p.stem, names)}; shipped: {', '.join(names)}")


def expand_shorthands(data: dict) -> dict:
    """`data.train: builtin:prose` -> a one-item list, so `--set data.train.0.weight=2` can index it."""
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("train", "eval"):
            if key in section:
                section[key] = _as_source_list(section[key])
    return data


def validate_recipe(data: dict, source: str, kind: str | None = None) -> TrainingRecipe:
    """Validate a recipe mapping as its `kind` (default: the `kind` argument, else pretrain).

    `kind` is the stage the user asked for (`tunelab finetune` -> finetune): a recipe without a
    kind takes it; one that names another kind is refused rather than silently reinterpreted.
    Method options are validated here too (by the method's own Options model), so a typo in
    them fails before any work. Imports no torch: method modules import it inside their hooks.
    """
    data = dict(data)
    named = data.get("kind")
    if named is not None and kind is not None and named != kind:
        raise ConfigError(f"{source}: kind: this is a {named!r} recipe; run it with `tunelab {named}` "
                          f"(or change kind to {kind!r})")
    data["kind"] = named or kind or "pretrain"
    if data["kind"] not in RECIPE_KINDS:
        raise ConfigError(f"{source}: kind: unknown kind {data['kind']!r}{did_you_mean(data['kind'], RECIPE_KINDS)}; "
                          f"known: {', '.join(RECIPE_KINDS)}")
    cfg = validate(data, source, RECIPE_KINDS[data["kind"]])
    if not isinstance(cfg, TrainingRecipe):  # a model operation (merge): no training method to check
        return cfg
    from tunelab.methods import method_class  # a registry of names: imports only the one method's module

    try:
        options = method_class(cfg.method.name).Options
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        options.model_validate(cfg.method.options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{source}: method.options", options)) from None
    return cfg


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> TrainingRecipe:
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(expand_shorthands(read_yaml(path)), list(overrides or []))
    return validate_recipe(data, str(path), kind)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- merge recipes (kind: merge)
# A merge works on saved models, without the training loop (stages/merge.py, ops/merge.py). Its sections
# differ from a training recipe's, so it is validated with `validate(data, source, MergeRecipe)`, not
# validate_recipe (which also checks a training method's options).

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
    # Sources every model (the merge and each parent) is scored on, all on their held-out split.
    # null: the sources the inputs and their ancestors trained on (lineage.json), else the built-in domains;
    # []: no evaluation.
    data: list[SourceSpec] | None = None
    seq_len: int = Field(256, ge=8)
    max_tokens: int | None = Field(32768, ge=1)  # per domain and model
    eval_fraction: float | None = Field(None, gt=0, lt=0.5)  # null: the smallest the inputs' runs held out
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
    vocab_policy: Literal["error"] = "error"  # vocabularies must match token by token

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


RECIPE_KINDS["merge"] = MergeRecipe
