"""The `merge` stage (`tunelab merge`, `merge:` in pipelines): saved models in, one HF model directory out.

1. Resolve the inputs (model directories, runs -> final/, LoRA adapters) and the base; refuse an
   occupied output directory. Everything below happens in `.<out>.tmp-<pid>` beside it, renamed at the
   end, so a failed merge writes nothing.
2. Adapters are merged onto their base (and models without safetensors weights converted) once.
3. Checks: architecture, tensors (the first that differs is named), config fields, vocabularies token by
   token. Each failure is a one-line ModelError.
4. Scores every parent on the eval sources (held-out split, the same text for all), then merges (ops/merge.py,
   streamed) and scores the result: one candidate, the greedy soup's trials, or every sweep candidate, of
   which only the best by worst-domain (or mean) loss is kept.
5. Writes model.safetensors, config.json, the tokenizer, lineage.json (every parent with role, path,
   weights_sha256, weight) and merge.json (the eval table, the decisions, peak RSS, the resolved recipe).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.config import MergeRecipe, RECIPES_DIR, apply_overrides, read_yaml, resolve_recipe_path, validate
from tunelab.errors import ConfigError, RunDirError

DEFAULT_EVAL = ["builtin:prose", "builtin:code", "builtin:tests"]
MERGED = "merge"  # the merged model's column in the eval table
MODEL_FILES = ("config.json", "generation_config.json")


# ---------------------------------------------------------------- recipes and the one-line form


MERGE_RECIPES_DIR = RECIPES_DIR / "merges"  # shipped merge recipes (apart: the training recipes' tests run every *.yaml)


def load_merge_recipe(recipe: str | Path, overrides: list[str] | None = None) -> MergeRecipe:
    """A merge recipe file (or shipped merge recipe name) with --set overrides, validated."""
    path = resolve_recipe_path(recipe, "merges")
    return validate_merge(apply_overrides(MergeRecipe.expand_shorthands(read_yaml(path)), list(overrides or [])),
                          str(path))


def validate_merge(data: dict, source: str) -> MergeRecipe:
    named = data.get("kind")
    if named is None and "models" not in data and {"model", "data", "train", "init_from"} & set(data):
        named = "pretrain"  # a training recipe without a kind: the kind its command gives it
    if named not in (None, "merge"):
        raise ConfigError(f"{source}: kind: this is a {named!r} recipe; run it with `tunelab {named}`")
    return validate({**data, "kind": "merge"}, source, MergeRecipe)


def is_recipe(arg: str) -> bool:
    """A YAML file or the name of a shipped recipe (a model directory never is)."""
    path = Path(arg)
    if path.is_dir():
        return False
    return path.suffix in (".yaml", ".yml") or (not path.exists() and any(
        (where / f"{arg}.yaml").is_file() for where in (MERGE_RECIPES_DIR, RECIPES_DIR)))


def parse_weights(text: str, n: int) -> list[float]:
    try:
        weights = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--weights: {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5") from None
    if len(weights) != n:
        raise ConfigError(f"--weights: {len(weights)} weights for {n} models; give one per model")
    return weights


def cli_recipe(args: list[str], method: str | None = None, base: str | None = None, weights: str | None = None,
               density: float | None = None, seed: int | None = None, data: list[str] | None = None,
               overrides: list[str] | None = None, name: str | None = None) -> MergeRecipe:
    """`tunelab merge RECIPE [--set ...]` or the one-line form `tunelab merge MODEL_DIR... --method ...`."""
    if not args:
        raise ConfigError("merge: give a merge recipe, or two or more model directories")
    if is_recipe(args[0]):
        flags = {"--method": method, "--base": base, "--weights": weights, "--density": density, "--seed": seed,
                 "--data": data or None}
        given = [flag for flag, value in flags.items() if value is not None]
        if len(args) > 1 or given:
            what = f"{given[0]}" if given else f"model directory {args[1]}"
            raise ConfigError(f"merge: {args[0]} is a recipe: change it with --set (e.g. --set method=ties, "
                              f"--set models.0.weight=0.3), not {what}")
        return load_merge_recipe(args[0], overrides)
    for arg in args:
        if arg.endswith((".yaml", ".yml")):
            raise ConfigError(f"merge: {arg}: a recipe must be the only argument (the models go in its `models:`)")
    models = [{"path": a} for a in args]
    if weights is not None:
        for model, w in zip(models, parse_weights(weights, len(args))):
            model["weight"] = w
    recipe: dict = {"name": name or "merge", "models": models, "method": method or "linear"}
    if base is not None:
        recipe["base"] = base
    options = {k: v for k, v in (("density", density), ("seed", seed)) if v is not None}
    if options:
        recipe["options"] = options
    if data:
        recipe["eval"] = {"data": list(data)}
    return validate_merge(apply_overrides(MergeRecipe.expand_shorthands(recipe), list(overrides or [])), "merge")


# ---------------------------------------------------------------- evaluation


class Scorer:
    """Held-out loss of a model directory on the recipe's sources: every model on the same text."""

    def __init__(self, cfg: MergeRecipe, inputs, log):
        from tunelab.config import DataConfig
        from tunelab.runs import ancestor_source_specs, trained_sources

        self.log = log
        if cfg.eval.data is None:  # what the inputs and their ancestors trained on, else the built-in domains
            found = ancestor_source_specs([item.path for item in inputs])
            self.sources = found or [{"source": s} for s in DEFAULT_EVAL]
        else:
            self.sources = [s.model_dump(exclude_defaults=True, exclude={"weight"}) for s in cfg.eval.data]
        fractions = [f for item in inputs for f in trained_sources(item.path).values() if f is not None]
        self.fraction = cfg.eval.eval_fraction or min(fractions, default=DataConfig().eval_fraction)
        self.seq_len, self.max_tokens, self.select = cfg.eval.seq_len, cfg.eval.max_tokens, cfg.eval.select

    def __call__(self, model_dir: Path) -> dict:
        from tunelab.evaluate import evaluate_model

        results = evaluate_model(str(model_dir), self.sources, seq_len=self.seq_len, max_tokens=self.max_tokens,
                                 eval_fraction=self.fraction, split="held-out", log=self.log)
        self.log = lambda *a: None  # the data lines once, not once per model
        return {d: {k: r[k] for k in ("loss", "ppl", "bpb", "eval_tokens")} for d, r in results.items()}

    def criterion(self, scores: dict) -> float:
        losses = [r["loss"] for r in scores.values()]
        return max(losses) if self.select == "worst" else sum(losses) / len(losses)

    def describe(self) -> dict:
        return {"sources": self.sources, "split": "held-out", "eval_fraction": self.fraction,
                "seq_len": self.seq_len, "max_tokens": self.max_tokens, "select": self.select}


def eval_table(scores: dict[str, dict], inputs: list[str], base: str | None = None, merged: str = MERGED) -> dict:
    """Domains x models (held-out loss): the merge's change against its best parent and the parents' mean per
    domain (merge inputs only, not the base), and the worst domain (the merge's highest loss)."""
    columns = inputs + ([base] if base else []) + [merged]
    rows = []
    for domain in scores[merged]:
        parents = {label: scores[label][domain]["loss"] for label in inputs}
        best = min(parents, key=lambda k: parents[k])
        loss = scores[merged][domain]["loss"]
        rows.append({"domain": domain, "loss": {c: scores[c][domain]["loss"] for c in columns},
                     "bpb": {c: scores[c][domain]["bpb"] for c in columns}, "best_parent": best,
                     "vs_best_parent": loss - parents[best], "vs_parent_mean": loss - sum(parents.values()) / len(parents)})
    worst = max(rows, key=lambda r: r["loss"][merged])
    worst_row = {c: max(r["loss"][c] for r in rows) for c in columns}
    parents_worst = {label: worst_row[label] for label in inputs}
    best_worst = min(parents_worst, key=lambda k: parents_worst[k])
    return {"columns": columns, "inputs": inputs, "base": base, "merged": merged, "rows": rows,
            "worst_domain": worst["domain"], "worst_loss": worst_row,
            "worst_vs_best_parent": worst_row[merged] - parents_worst[best_worst], "best_parent_worst": best_worst,
            "worst_vs_parent_mean": worst_row[merged] - sum(parents_worst.values()) / len(parents_worst)}


def render_table(table: dict) -> str:
    """The eval table as aligned text lines."""
    columns = table["columns"]
    names = [f"{c} (base)" if c == table["base"] and c != "base" else c for c in columns]
    header = ["domain", *names, "vs best parent", "vs parent mean"]
    lines = []
    for row in table["rows"]:
        mark = " *" if row["domain"] == table["worst_domain"] else ""
        lines.append([row["domain"] + mark, *(f"{row['loss'][c]:.4f}" for c in columns),
                      f"{row['vs_best_parent']:+.4f} ({row['best_parent']})", f"{row['vs_parent_mean']:+.4f}"])
    lines.append(["worst domain", *(f"{table['worst_loss'][c]:.4f}" for c in columns),
                  f"{table['worst_vs_best_parent']:+.4f} ({table['best_parent_worst']})",
                  f"{table['worst_vs_parent_mean']:+.4f}"])
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in lines),
                      f"held-out loss, lower is better; a negative change is a gain. * the merge's worst domain: "
                      f"{table['worst_domain']}"])


# ---------------------------------------------------------------- the stage


def run_merge(cfg: MergeRecipe, out=None, resume: bool = False, quiet: bool = False, log=None) -> Path:
    """Merge the recipe's models into `out` (default runs/<name>): a plain HF model directory with
    lineage.json and merge.json. With resume, a finished merge in `out` is kept and returned."""
    from tunelab.ops import merge as ops
    from tunelab.ops import merge_inputs

    log = (lambda *a: None) if quiet else (log or print)
    out = Path(out).expanduser() if out else Path("runs") / cfg.name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if resume and (out / "merge.json").is_file():
            log(f"{out}: merge already done, kept")
            return out
        raise RunDirError(f"{out} already exists and is not empty: choose a new --out (nothing was changed)")
    inputs = [merge_inputs.resolve_input(m.path, "merge-input", f"models.{i}.path") for i, m in enumerate(cfg.models)]
    for item, m in zip(inputs, cfg.models):
        item.weight = m.weight
    base = merge_inputs.resolve_input(cfg.base, "base", "base") if cfg.base else None
    everyone = inputs + ([base] if base else [])
    merge_inputs.unique_labels(everyone)
    options = cfg.options.model_dump()
    started = time.time()

    from tunelab.runs import staged_dir

    with staged_dir(out) as staged:  # renamed to `out` at the end; removed on any error
        staging = staged / ".work"  # converted adapters and candidates; the chosen one's files move up
        staging.mkdir()
        for item in everyone:
            merge_inputs.materialize(item, staging, log)
        files = [ops.WeightFiles(item.model_dir, item.label) for item in everyone]
        merge_inputs.check_configs(everyone, files)
        tokenizer = merge_inputs.check_vocabularies(everyone)
        input_files, base_files = files[:len(inputs)], (files[-1] if base else None)
        log(f"merging {len(inputs)} models with {cfg.method}"
            + (f" onto base {base.label}" if base else "") + ": " + ", ".join(i.label for i in inputs))

        scorer = Scorer(cfg, everyone, log) if (cfg.eval.data is None or cfg.eval.data) else None
        scores: dict[str, dict] = {}
        if scorer is not None:
            log(f"scoring on {', '.join(s['source'] for s in scorer.sources)} (held-out split, fraction "
                f"{scorer.fraction})")
            for item in everyone:
                scores[item.label] = scorer(item.path)

        counter = iter(range(1 << 30))

        def build(weights, opts, members=None) -> dict:
            where = staging / f"candidate-{next(counter)}"
            where.mkdir()
            chosen = input_files if members is None else [input_files[m] for m in members]
            summary = ops.measured_merge(chosen, where / "model.safetensors", cfg.method, opts, weights=weights,
                                         base=base_files)
            for name in MODEL_FILES:
                if (inputs[0].model_dir / name).is_file():
                    shutil.copy2(inputs[0].model_dir / name, where / name)
            tokenizer.save_pretrained(where)
            candidate = {"dir": where, "merge": summary, "weights": weights, "options": opts, "members": members}
            if scorer is not None:
                candidate["scores"] = scorer(where)
                candidate["score"] = scorer.criterion(candidate["scores"])
            return candidate

        record: dict = {}
        weights = [m.weight for m in cfg.models] if cfg.models[0].weight is not None else None
        if cfg.method == "greedy_soup":
            individual = [scorer.criterion(scores[i.label]) for i in inputs]
            trials: dict[tuple, dict] = {}

            def score(members: list[int]) -> float:
                trials[tuple(members)] = build(None, options, members)
                return trials[tuple(members)]["score"]

            members, decisions = ops.greedy_soup(individual, score, names=[i.label for i in inputs], log=log)
            for d in decisions:
                d["model"] = inputs[d["model"]].label
            chosen = trials.get(tuple(members)) or build(None, options, members)
            candidates = [chosen]
            for trial in trials.values():
                if trial is not chosen:
                    shutil.rmtree(trial["dir"])
            record["greedy_soup"] = {"order": [d["model"] for d in decisions], "decisions": decisions,
                                     "members": [inputs[m].label for m in members], "select": scorer.select}
            why = f"greedy soup of {len(members)} of {len(inputs)} inputs"
        elif cfg.sweep is not None:
            grid = ([(w, options) for w in cfg.sweep.weights] if cfg.sweep.weights is not None
                    else [(weights, {**options, "density": d}) for d in cfg.sweep.density])
            candidates = []
            for w, opts in grid:
                candidate = build(w, opts)
                what = f"weights {w}" if cfg.sweep.weights is not None else f"density {opts['density']}"
                log(f"sweep: {what}: {scorer.select}-domain loss {candidate['score']:.4f}")
                candidates.append(candidate)
            chosen = min(candidates, key=lambda c: c["score"])  # the first of equals
            what = (f"weights {chosen['weights']}" if cfg.sweep.weights is not None
                    else f"density {chosen['options']['density']}")
            why = (f"sweep: {what} has the lowest {scorer.select}-domain held-out loss ({chosen['score']:.4f}) of "
                   f"{len(candidates)} candidates")
            record["sweep"] = [{"weights": c["weights"], "density": c["options"].get("density"), "score": c["score"],
                                "scores": c["scores"], "chosen": c is chosen} for c in candidates]
            for c in candidates:
                if c is not chosen:
                    shutil.rmtree(c["dir"])
            log(why + "; only it is kept")
        else:
            chosen = build(weights, options)
            why = "the recipe's weights and options"

        # Records: which inputs went in with which weight.
        from tunelab.runs import weight_files_sha256

        effective = chosen["merge"]["weights"]
        members = chosen["members"] if chosen["members"] is not None else list(range(len(inputs)))
        parents = []
        for i, item in enumerate(inputs):
            entry = {"role": "merge-input", "path": str(item.path.resolve()), "label": item.label,
                     "weights_sha256": weight_files_sha256(item.path),
                     "weight": effective[members.index(i)] if i in members else 0.0}
            if cfg.method == "greedy_soup":
                entry["kept"] = i in members
            if item.adapter:
                entry["adapter_base"] = item.info.get("adapter_base")
            parents.append(entry)
        if base:
            parents.append({"role": "base", "path": str(base.path.resolve()), "label": base.label,
                            "weights_sha256": weight_files_sha256(base.path), "weight": None,
                            **({"adapter_base": base.info.get("adapter_base")} if base.adapter else {})})
        method = {"name": cfg.method, "options": {k: v for k, v in chosen["options"].items() if v is not None}}
        from tunelab.tokenizers import tokenizer_fingerprint

        lineage = {"name": cfg.name, "stage": "merge", "parents": parents, "method": method,
                   "tokenizer": {"source": str(inputs[0].path.resolve()),
                                 "fingerprint": tokenizer_fingerprint(tokenizer)},
                   "vocab_policy": cfg.vocab_policy}
        mem = chosen["merge"]["memory"]
        mb = 1 << 20
        log(f"peak RSS during the merge: {mem['peak_rss_bytes'] / mb:,.0f} MB ({mem['added_bytes'] / mb:,.1f} MB above "
            f"the {mem['rss_before_bytes'] / mb:,.0f} MB before it); one model {mem['model_bytes'] / mb:,.1f} MB, all "
            f"inputs {mem['inputs_bytes'] / mb:,.1f} MB")
        merge_record = {"name": cfg.name, "method": method, "weights": effective, "chosen": why,
                        "inputs": [i.label for i in inputs], "base": base.label if base else None,
                        "merge": {k: v for k, v in chosen["merge"].items() if k != "weights"}, **record,
                        "seconds": round(time.time() - started, 2), "recipe": cfg.model_dump(mode="json")}
        if scorer is not None:
            scores[MERGED] = chosen["scores"]
            table = eval_table(scores, [i.label for i in inputs], base.label if base else None)
            merge_record["eval"] = {**scorer.describe(), "table": table, "scores": scores}
            log(render_table(table))
        for file in chosen["dir"].iterdir():
            file.rename(staged / file.name)
        (staged / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (staged / "merge.json").write_text(json.dumps(merge_record, indent=2, default=str) + "\n")
        for files_open in files:
            files_open.close()
        shutil.rmtree(staging)
    log(f"wrote {out}")
    return out
