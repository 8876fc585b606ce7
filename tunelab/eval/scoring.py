"""Held-out scores of saved models: `evaluate_model` (what `tunelab eval` reports per source) and the
`Scorer` every model operation uses to score models before and after (merge, prune, average).

The split rule, the same in every command: a source the model, or any model it descends from, trained
on (by content hash, through lineage.json) is scored on the held-out split that training used (its
recorded eval_fraction; the smallest, if several ancestors held it out), so a model is never scored on
text it has seen; any other source is scored whole. An operation scoring several models (a merge's
parents, a prune's before and after) applies the rule to what any of them trained on, so all score the
same text, and that text is what `tunelab eval` scores for a model that trained on it.
"""

from __future__ import annotations

from pathlib import Path

from tunelab import lineage, models, tokenizers
from tunelab.config import SourceSpec, _as_source_list, validate
from tunelab.paths import resolve_cache_dir

DEFAULT_EVAL = ["builtin:prose", "builtin:code", "builtin:tests"]  # what an operation scores without a rule

SPLITS = ("auto", "held-out", "whole")


def run_recipe(model_dir: str) -> dict | None:
    """The resolved recipe of the run that wrote `model_dir` (its final/ or a checkpoint), if any.

    Evaluation must hold out the same split (eval_fraction), mask the same way (packing, MLM
    probability) and know which sources the model was trained on.
    """
    import yaml

    if str(model_dir).startswith("package:"):  # a model shipped in a Python package: no run around it
        return None
    candidates = [Path(model_dir).parent / "config.yaml", Path(model_dir).parent.parent / "config.yaml"]
    run = (lineage.read(model_dir) or {}).get("run")  # a model averaged from a run's checkpoints names the run
    candidates += [Path(run) / "config.yaml"] if isinstance(run, str) else []
    for candidate in candidates:
        if candidate.is_file():
            try:
                recipe = yaml.safe_load(candidate.read_text())
                return recipe if isinstance(recipe, dict) and isinstance(recipe.get("data"), dict) else None
            except yaml.YAMLError:
                return None
    return None


def load(model_dir: str, base: str | None = None) -> tuple:
    """(model, tokenizer) of a model or adapter directory."""
    tokenizer = tokenizers.load_tokenizer(model_dir, "MODEL_DIR")
    return models.load_model(model_dir, field="MODEL_DIR", base=base), tokenizer


def source_specs(sources: list[str]) -> list:
    return [validate(s, "--data", SourceSpec) for s in _as_source_list(sources)]


def evaluate_model(model_dir: str, sources: list[str], seq_len: int = 256, max_tokens: int | None = None,
                   eval_fraction: float | None = None, base: str | None = None, split: str = "auto",
                   log=print, trained: dict | None = None, loaded: tuple | None = None) -> dict:
    """Per-domain loss / perplexity / bits per byte of a model (or adapter) directory.

    split="auto": a source the model or any of its ancestors trained on (by content hash, through
    lineage.json) is scored on its held-out split only (the smallest eval_fraction any of them held
    out), so a model is never scored on text it has seen; any other source is scored whole, as training
    scores its eval-only sources. "held-out" / "whole" force one or the other (to compare models of
    different histories on the same text, use "held-out").
    `trained` (content hash -> eval_fraction) replaces the model's own trained sources in that rule
    (evaluate_suite passes what any of the compared models trained on, so all score the same text);
    `loaded` is the (model, tokenizer) already loaded from model_dir.
    """
    from tunelab.config import DataConfig
    from tunelab.data import source_content_hash, tokenize_source
    from tunelab.eval.perplexity import evaluate_tokens, token_byte_lengths
    from tunelab.runs import trained_sources

    if split not in SPLITS:
        from tunelab.errors import ConfigError

        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    recipe = run_recipe(model_dir) or {}
    run_data = recipe.get("data", {})
    defaults = DataConfig()
    explicit_fraction = eval_fraction
    eval_fraction = eval_fraction or run_data.get("eval_fraction", defaults.eval_fraction)
    packing = run_data.get("packing", defaults.packing)

    model, tokenizer = loaded or load(model_dir, base)
    seq_len = min(seq_len, models.max_positions(model) or seq_len)
    models.check_pair(model, tokenizer, seq_len)
    specs = source_specs(sources)
    eos = tokenizers.eos_id(tokenizer)
    objective = "mlm" if models.is_encoder(model) else "clm"
    label_fn = None
    if objective == "mlm":  # masked as the run trained: its mask probability and whole-word setting
        from tunelab.objectives import create_objective, recorded_objective
        from tunelab.train.objectives import fixed_mlm_labeler

        name, options = recorded_objective(recipe)
        label_fn = fixed_mlm_labeler(**create_objective("mlm", options if name == "mlm" else {}).masking(tokenizer))
    byte_lengths = token_byte_lengths(tokenizer)
    cache = resolve_cache_dir()
    seen = trained_sources(model_dir) if trained is None else trained
    results = {}
    for spec in specs:
        digest = source_content_hash(spec, cache, log=log)
        held_out = split == "held-out" or (split == "auto" and digest in seen)
        fraction = explicit_fraction or seen.get(digest) or eval_fraction
        src = tokenize_source(spec, tokenizer, eos, cache, fraction, log=log, split=held_out)
        results[src.domain] = evaluate_tokens(model, src.eval, seq_len, eos_id=eos, document_mask=packing != "concat",
                                              byte_lengths=byte_lengths, max_tokens=max_tokens, objective=objective,
                                              label_fn=label_fn, loss_mask=src.eval_mask, starts=src.eval_starts)
        results[src.domain].update(split="held-out" if held_out else "whole", eval_fraction=fraction if held_out else None)
    return results


class Scorer:
    """Held-out loss of model directories on an operation's `eval` section (config.OpEval): every model on
    the same text, by the split rule above applied to what any of `model_dirs` trained on (plus `calibrated`:
    content hash -> fraction of sources the operation itself fitted on, kept out of the scored text)."""

    def __init__(self, cfg, model_dirs: list, log, calibrated: dict | None = None):
        from tunelab.runs import ancestor_source_specs, trained_sources

        self.log = log
        if cfg.data is None:  # what the inputs and their ancestors trained on, else the built-in domains
            self.sources = ancestor_source_specs(model_dirs) or [{"source": s} for s in DEFAULT_EVAL]
        else:
            self.sources = [s.model_dump(exclude_defaults=True, exclude={"weight"}) for s in cfg.data]
        self.trained: dict = dict(calibrated or {})
        for model_dir in model_dirs:
            for digest, fraction in trained_sources(model_dir).items():
                known = [f for f in (self.trained.get(digest), fraction) if f is not None]
                self.trained[digest] = min(known) if known else None
        self.eval_fraction, self.seq_len, self.max_tokens = cfg.eval_fraction, cfg.seq_len, cfg.max_tokens
        self.select = cfg.select
        self.splits: dict = {}  # domain -> {split, eval_fraction}: what was scored

    def __call__(self, model_dir) -> dict:
        results = evaluate_model(str(model_dir), self.sources, seq_len=self.seq_len, max_tokens=self.max_tokens,
                                 eval_fraction=self.eval_fraction, trained=self.trained, log=self.log)
        if not self.splits:
            self.splits = {d: {"split": r["split"], "eval_fraction": r["eval_fraction"]} for d, r in results.items()}
            self.log("scored on " + ", ".join(
                f"{d} (" + (f"held-out split, eval_fraction {s['eval_fraction']}: as its training held it out)"
                            if s["split"] == "held-out" else "whole: not trained on)") for d, s in self.splits.items()))
            self.log = lambda *a: None  # the data lines once, not once per model
        return {d: {k: r[k] for k in ("loss", "ppl", "bpb", "eval_tokens")} for d, r in results.items()}

    def criterion(self, scores: dict) -> float:
        losses = [r["loss"] for r in scores.values()]
        return max(losses) if self.select == "worst" else sum(losses) / len(losses)

    def describe(self) -> dict:
        return {"sources": self.sources, "splits": self.splits, "seq_len": self.seq_len,
                "max_tokens": self.max_tokens, "select": self.select}


def render_before_after(before: dict, after: dict) -> str:
    """Held-out loss per domain before and after an operation, as aligned text."""
    rows = [[d, f"{before[d]['loss']:.4f}", f"{after[d]['loss']:.4f}", f"{after[d]['loss'] - before[d]['loss']:+.4f}"]
            for d in after]
    header = ["domain", "before", "after", "change"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in rows), "held-out loss, lower is better"])


