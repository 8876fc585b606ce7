"""The training recipe (kinds pretrain and finetune): every section of it, with its defaults.

This is the only place training defaults live. A key in YAML maps 1:1 to a field here; grep the
field name to find the line that uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from tunelab.config.base import Section, did_you_mean


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


# Built-in sources generated as tables (data/instruct.py), by the format they always have.
TABLE_BUILTINS = {"builtin:instruct": "chat", "builtin:preference": "preference"}


class SourceSpec(Section):
    source: str  # builtin:prose|code|tests, a .txt/.jsonl/.parquet file, a folder, or hf:<dir>
    weight: float = Field(1.0, gt=0)
    name: str | None = None  # domain name in metrics; default derived from the source
    text_field: str = "text"  # jsonl / parquet / HF datasets column holding the text
    split: str = "train"  # HF datasets split
    # text: documents (text_field). chat: instruction examples (rows with `messages`, `prompt`/`response` or
    # `instruction`/`input`/`output`), rendered with the tokenizer's chat template (data/chat.py); the loss is on
    # assistant turns only. builtin:instruct is always chat. preference: pairs (rows with `prompt` or `messages`,
    # `chosen`, `rejected`) for the preference methods (dpo, simpo, orpo); builtin:preference is always preference.
    format: Literal["text", "chat", "preference"] = "text"
    assistant_turns: Literal["all", "last"] = "all"  # chat: which assistant turns are training targets

    @model_validator(mode="before")
    @classmethod
    def _instruct_is_chat(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") in TABLE_BUILTINS and "format" not in data:
            data = {**data, "format": TABLE_BUILTINS[data["source"]]}
        return data

    @model_validator(mode="after")
    def _chat_options(self) -> "SourceSpec":
        fmt = TABLE_BUILTINS.get(self.source)
        if fmt is not None and self.format != fmt:
            raise ValueError(f"format: {self.source} holds {fmt} examples: leave format unset (or {fmt})")
        if self.format != "chat" and self.assistant_turns != "all":
            raise ValueError("assistant_turns: only for format: chat")
        return self

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
    # document: same packing, but position ids restart per document so attention stays inside it; a chat
    # source's examples are packed whole into rows (several per row, padded, never cut across rows).
    # pad: a chat source's examples one per row, padded (text sources: as document).
    packing: Literal["concat", "document", "pad"] = "concat"
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
    # anneal: the LR multiplier the decay starts from, e.g. the plateau of the run it branches off (1 after a wsd's
    # stable phase, constant_ratio after an infinite's constant phase); `tunelab anneal` computes it.
    start_ratio: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _anneal_only(self) -> "ScheduleConfig":
        if self.name != "anneal" and self.start_ratio != 1.0:  # 1.0: the default every config.yaml holds
            raise ValueError(f"start_ratio: only for name: anneal (where its decay starts); remove it for {self.name}")
        return self


class TrainConfig(Section):
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
    # Recompute each layer's activations in the backward pass instead of keeping them (transformers' activation
    # checkpointing, non-reentrant): activation memory falls from all layers' to about one layer's, for ~1/3 more
    # compute per step. The losses and gradients are the same.
    gradient_checkpointing: bool = False
    # The causal-LM loss with the head and cross-entropy run over this many target tokens at a time, each
    # chunk's logits freed at once and recomputed in the backward pass (train/chunked_loss.py): the batch's
    # logits (targets x vocabulary) are never whole. For large vocabularies; the loss is the same.
    loss_chunk_tokens: int | None = Field(None, ge=1)
    # Host memory back to the OS as soon as it is freed (train/host_memory.py: glibc's mmap threshold fixed at
    # 1 MiB for the process): resident memory follows the live tensors instead of the heap's high-water mark,
    # for 12-30% fewer tokens/s on CPU (measured at 200M). For a CPU run that must fit in RAM; same numbers.
    release_freed_memory: bool = False
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
    """Which weights train and how they are saved (full, lora, lisa, ...)."""
    name: str = "full"  # a key of methods.METHODS
    options: dict[str, Any] = Field(default_factory=dict)  # method-specific, validated by the method


class ObjectiveConfig(Section):
    """What the loss is: clm, mlm, dpo, simpo, orpo (objectives.OBJECTIVES). Unset: mlm for an encoder, else clm
    (decided from the starting model when the recipe is checked, so config.yaml always names it)."""
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # objective-specific, validated by the objective


# Recipes written before objectives were their own axis get their new spelling in one line.
_MOVED_TO_OBJECTIVE = ("objective", "mlm_probability", "whole_word_masking")  # train.<key> -> objective
_OLD_PREFERENCE_METHODS = ("dpo", "simpo", "orpo")  # method.name -> objective.name


def _old_spelling(data: Any) -> None:
    if not isinstance(data, dict):
        return
    flow = lambda value: yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()  # noqa: E731
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    moved = [k for k in _MOVED_TO_OBJECTIVE if k in train]
    if moved:
        options = {k: train[k] for k in moved if k != "objective"}
        new = {"name": train.get("objective", "mlm"), **({"options": options} if options else {})}
        raise ValueError(f"{', '.join('train.' + k for k in moved)}: moved to their own section: write "
                         f"objective: {flow(new)}")
    method = data.get("method") if isinstance(data.get("method"), dict) else {}
    if method.get("name") in _OLD_PREFERENCE_METHODS:
        options = dict(method.get("options") or {})
        tuning = options.pop("tuning", None) or {"name": "full"}
        new = {"name": method["name"], **({"options": options} if options else {})}
        raise ValueError(f"method.name: {method['name']} is an objective now: write objective: {flow(new)} and "
                         f"method: {flow(tuning)}")


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
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_old_spelling(cls, data: Any) -> Any:
        _old_spelling(data)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainingRecipe":
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
        replayed = self.data.replay.sources if self.data.replay is not None else []
        self._check_preference(replayed)
        if (self.init_optimizer or self.init_data_state) and self.init_from is None:
            raise ValueError("init_from: init_optimizer / init_data_state carry state from a run: set init_from "
                             "to that run or one of its checkpoints")
        self._check_data_extras()
        self._check_schedule()
        return self

    def _check_preference(self, replayed: list) -> None:
        pairs = [s for s in self.data.train if s.format == "preference"]
        elsewhere = [s for s in self.data.eval + replayed if s.format == "preference"]
        if elsewhere:
            raise ValueError(f"data: {elsewhere[0].source} holds preference pairs: list it in data.train (its held-out "
                             "pairs are scored there), not in data.eval or data.replay")
        if pairs and len(pairs) != len(self.data.train):
            raise ValueError(f"data.train: {pairs[0].source} holds preference pairs, which cannot be mixed with text or "
                             "chat sources in one run: run SFT and preference tuning as two stages")
        if pairs and any(s.weight != 1.0 for s in pairs):
            raise ValueError("data.train: preference sources are read one after another in one shuffled order; "
                             "weights are not supported (leave weight unset)")
        if pairs and self.data.mixture_schedule:
            raise ValueError("data.mixture_schedule: not for preference pairs")

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
        _old_spelling(data)  # before this validator reads `method`
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {**data["method"], "name": "lora"}}
        return data

    @model_validator(mode="after")
    def _needs_a_trained_model(self) -> "FinetuneRecipe":
        if self.model.path is None and self.init_from is None:
            raise ValueError("model.path: a finetune starts from a trained model: set model.path "
                             "(e.g. runs/quickstart/final, or --set model.path=DIR) or init_from (a run)")
        return self


RecipeConfig = TrainingRecipe  # the type every training recipe has (for annotations)
