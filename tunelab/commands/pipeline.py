"""`tunelab run PIPELINE.yaml`: stages in order, meeting only through their outputs.

    name: demo
    stages:
      - name: base                      # output: a model, <out>/base/final (a run directory around it)
        pretrain: quickstart            # any training kind (pretrain, finetune, ...): a recipe file
        set: {train.max_steps: 50}      #   (relative to this YAML) or a shipped recipe name
      - name: code-lora                 # output: an adapter (its method is a peft method)
        finetune: lora-code
        set: {model.path: "${base}"}    # ${stage} = that stage's output, whatever it is (a model or
                                        # adapter dir, a dataset dir, an eval.json)
      - name: score                     # output: an evaluation, <out>/score/eval.json
        eval: "${code-lora}"            # a model or adapter directory
        data: [builtin:prose, builtin:code]
      - name: soup                      # a model operation; output: <out>/soup/final
        merge: merge-soup               # its recipe may name earlier stages too
        set: {models: ["${base}", "${code-lora}"]}

Each kind declares what it produces (stages.OUTPUTS); a `${stage}` in a data field (`data...`, `sources`)
must name a dataset, anywhere else a model or an adapter, else a one-line error. Keys, skipping, resuming
and fresh `<name>.<key[:8]>` directories for stale stages are stage_keys.py's; every stage is planned
(recipes validated, keys computed) before the first one runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.config import apply_overrides, dump_config, expand_shorthands, read_yaml, resolve_recipe_path, validate
from tunelab.recipe import validate_recipe
from tunelab.errors import ConfigError
from tunelab.stage_keys import Plan, data_hashes, plan_stage, stage_key

REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
EVAL_KIND = "eval"
EVAL_FIELDS = ("data", "seq_len", "max_tokens", "split")  # what only an eval stage reads; `set` it does not
DATA_FIELDS = {"data", "sources"}  # a ${stage} under a field of these names is a data source
ACTION_TEXT = {"skip": "skip (up to date)", "resume": "resume (interrupted)", "run": "run",
               "stale": "re-run (stale: a fresh directory)"}


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _kinds() -> list[str]:
    from tunelab.stages import STAGES

    return [*STAGES, EVAL_KIND]


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: str  # a registered stage kind, or eval
    target: str  # the recipe (training kinds) or the model directory (eval)
    set: dict[str, Any] = Field(default_factory=dict)
    data: list[str] = Field(default_factory=lambda: ["builtin:prose", "builtin:code", "builtin:tests"])
    seq_len: int = 256
    max_tokens: int | None = None
    split: Literal["auto", "held-out", "whole"] = "auto"  # eval (see evaluate.evaluate_model)

    @model_validator(mode="before")
    @classmethod
    def _kind_key(cls, data: Any) -> Any:
        """`pretrain: RECIPE` (or any registered kind) -> kind + target."""
        if not isinstance(data, dict) or "kind" in data:
            return data
        data = dict(data)
        found = [k for k in _kinds() if k in data]
        if len(found) != 1:
            raise ValueError(f"a stage needs exactly one of {', '.join(f'`{k}:`' for k in _kinds())} "
                             f"(got {', '.join(found) or 'none'})")
        data["kind"], data["target"] = found[0], data.pop(found[0])
        return data

    @model_validator(mode="after")
    def _fields_read(self) -> "Stage":
        """A field this kind does not read is an error (not silently dropped)."""
        if self.kind not in _kinds():
            raise ValueError(f"unknown stage kind {self.kind!r}; known: {', '.join(_kinds())}")
        unread = [f for f in (("set",) if self.kind == EVAL_KIND else EVAL_FIELDS) if f in self.model_fields_set]
        if unread:
            where = ("an eval stage has no recipe: use data, seq_len, max_tokens, split" if self.kind == EVAL_KIND
                     else f"only eval stages read it; put it in the recipe (set: {{data.{unread[0]}: ...}})")
            raise ValueError(f"stage {self.name}: {_a(self.kind)} stage does not read `{unread[0]}` ({where})")
        return self


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "pipeline"
    stages: list[Stage]

    @model_validator(mode="after")
    def _unique_names(self) -> "Pipeline":
        names = [s.name for s in self.stages]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"stage names must be unique: {', '.join(sorted(dupes))}")
        return self


def _substitute(value: Any, outputs: dict[str, Path], types: dict[str, str], stage: str, used: set[str],
                field: tuple = ()) -> Any:
    """`${name}` -> that stage's output; `field` (the keys down to value, dotted `set` keys split) decides the
    type it must be: a dataset under a data field, else a model or an adapter."""
    if isinstance(value, str):
        def repl(m):
            ref = m.group(1)
            if ref not in outputs:
                raise ConfigError(f"stage {stage}: ${{{ref}}} names no earlier stage "
                                  f"(earlier: {', '.join(outputs) or 'none'})")
            wanted = ("dataset",) if DATA_FIELDS & set(field) else ("model", "adapter")
            if types[ref] not in wanted:
                raise ConfigError(f"stage {stage}: {'.'.join(field) or 'its input'} takes a {' or '.join(wanted)}, "
                                  f"but ${{{ref}}} is {_a(types[ref])}")
            used.add(ref)
            return str(outputs[ref])
        return REF.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, outputs, types, stage, used, field) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, types, stage, used, field + tuple(str(k).split(".")))
                for k, v in value.items()}
    return value


@dataclass
class _Job:
    stage: Stage
    plan: Plan
    output_type: str
    upstream: dict[str, str]  # stage name -> key, of the stages it names
    target: str  # the resolved target: what an eval stage scores, the recipe of others
    cfg: Any = None  # the validated recipe (not for eval)
    recipe_path: Path | None = None
    eval_data: list[str] | None = None


def plan_pipeline(path: Path, out: Path | None = None, overrides: list[str] | None = None, until: str | None = None,
                  log=print) -> tuple[Any, Path, list[_Job]]:
    """(the pipeline, its root, one job per stage up to `until`): every recipe validated, every key computed and
    every stage's directory and action decided (stage_keys.plan_stage), before anything runs or is written."""
    from tunelab.runs import weight_files_sha256
    from tunelab.stages import OUTPUT_PATHS, OUTPUTS, output_type
    from tunelab.paths import resolve_cache_dir

    path = Path(path)
    spec = validate(read_yaml(path), str(path), Pipeline)
    names = [s.name for s in spec.stages]
    if until is not None and until not in names:
        raise ConfigError(f"--only {until}: {path} has no such stage (stages: {', '.join(names)})")
    root = Path(out) if out else Path("runs") / spec.name
    outputs: dict[str, Path] = {}
    types: dict[str, str] = {}
    keys: dict[str, str] = {}
    jobs = []
    for stage in spec.stages[:names.index(until) + 1 if until else None]:
        used: set[str] = set()
        resolved = _substitute(stage.model_dump(), outputs, types, stage.name, used)
        produced = {str(output) for output in outputs.values()}
        job = _Job(stage, None, "evaluation", {}, resolved["target"])
        if stage.kind == EVAL_KIND:
            from tunelab.config import SourceSpec, _as_source_list

            sources = [validate(s, f"{path} stage {stage.name}: data", SourceSpec) for s in _as_source_list(resolved["data"])]
            upstream = {ref: keys[ref] for ref in sorted(used)}
            key = stage_key({"stage": resolved, "upstream": upstream,
                             "data": data_hashes(sources, resolve_cache_dir(), log, produced)})
            job.eval_data = resolved["data"]
        elif not _trains(stage.kind):  # a model operation (merge): ${stage} may also appear in its recipe
            job.recipe_path, job.cfg, key = _operation(stage, resolved, outputs, types, keys, used, path, log)
            job.output_type = OUTPUTS[stage.kind]
        else:
            job.recipe_path = _recipe_path(resolved["target"], path.parent)
            data = expand_shorthands(read_yaml(job.recipe_path))
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in resolved["set"].items()]
                                   + list(overrides or []))
            cfg = job.cfg = validate_recipe(data, f"{path} stage {stage.name}", kind=stage.kind)
            job.output_type = output_type(stage.kind, cfg)
            cache = resolve_cache_dir(cfg.data.cache_dir)
            model_path = cfg.model.path or cfg.init_from
            outside = model_path and model_path not in produced and Path(model_path).is_dir()
            if outside and cfg.init_from:  # a run or checkpoint from outside: hash the weights it gives
                from tunelab.stages.setup import resolve_init

                model_path = str(resolve_init(cfg).model_dir)
            replay = cfg.data.replay.sources if cfg.data.replay else []
            upstream = {ref: keys[ref] for ref in sorted(used)}
            key = stage_key({"recipe": dump_config(cfg), "upstream": upstream,
                             "data": data_hashes(cfg.data.train + cfg.data.eval + replay, cache, log, produced),
                             "model": weight_files_sha256(Path(model_path)) if outside else None})
        job.upstream = {ref: keys[ref] for ref in sorted(used)}
        job.plan = plan_stage(root, stage.name, key, OUTPUT_PATHS[job.output_type])
        keys[stage.name], types[stage.name], outputs[stage.name] = key, job.output_type, job.plan.output
        jobs.append(job)
    return spec, root, jobs


def run_pipeline(path: Path, out: Path | None = None, quiet: bool = False, overrides: list[str] | None = None,
                 resume: bool = True, dry_run: bool = False, only: str | None = None) -> dict[str, Path]:
    """Run the stages in order; returns each stage's output. `overrides` (--set) apply to every training stage,
    after the stage's own `set`. `resume` (the default, as before the option existed): an interrupted stage
    with the same key continues; False refuses it. `dry_run`: print the plan, run and write nothing. `only`:
    run just that stage (the outputs it reads must exist), no report."""
    log = (lambda *a: None) if quiet else print
    spec, root, jobs = plan_pipeline(path, out, overrides, until=only, log=log)
    outputs = {job.stage.name: job.plan.output for job in jobs}
    if dry_run:
        _print_plan(jobs)
        return outputs
    if only is not None:
        jobs, upstream = jobs[-1:], {job.stage.name: job.plan.action for job in jobs}
        missing = [name for name in jobs[0].upstream if upstream[name] != "skip"]
        if missing:
            raise ConfigError(f"--only {only}: it reads stage {missing[0]}'s output, which is not there ({missing[0]}: "
                              f"{ACTION_TEXT[upstream[missing[0]]]}); run the pipeline without --only first")
    interrupted = [job for job in jobs if job.plan.action == "resume"]
    if interrupted and not resume:
        raise ConfigError(f"stage {interrupted[0].stage.name}: {interrupted[0].plan.dir} holds an interrupted run of "
                          "it; pass --resume to continue it, or move that directory away")
    for job in jobs:
        _run_job(job, quiet, log)
    if only is None:
        root.mkdir(parents=True, exist_ok=True)  # (a pipeline of no stages has no directory yet)
        report = _report(jobs, root, spec.name, log)
        log(f"pipeline {spec.name}: {len(spec.stages)} stages, outputs in {root}; report: {report}")
    return outputs


def _run_job(job: _Job, quiet: bool, log) -> None:
    from tunelab.stages import run_stage

    stage, plan = job.stage, job.plan
    if plan.action == "skip":
        log(f"[{stage.name}] up to date, skipped ({plan.dir})")
    else:
        record = {"kind": stage.kind, "output": job.output_type, "upstream": job.upstream}
        plan.begin(**record)
        if stage.kind == EVAL_KIND:
            from tunelab.commands.evaluate import eval_record, evaluate_model
            from tunelab.runs import atomic_write

            log(f"[{stage.name}] eval {job.target} on {', '.join(job.eval_data)}")
            results = evaluate_model(job.target, job.eval_data, seq_len=stage.seq_len, max_tokens=stage.max_tokens,
                                     split=stage.split, log=log)
            atomic_write(plan.output, json.dumps(eval_record(results, job.target), indent=2))
        else:
            log(f"[{stage.name}] {stage.kind} {job.recipe_path.name} -> {plan.dir}")
            trains = _trains(stage.kind)  # an operation writes its output straight to <stage>/<output>
            run_stage(job.cfg, out=plan.dir if trains else plan.output, quiet=quiet,
                      resume=plan.action == "resume" and (not trains or (plan.dir / "config.yaml").exists()))
        plan.finish(**record)
    if stage.kind == EVAL_KIND and not quiet:
        from tunelab.commands.evaluate import render_eval

        render_eval(json.loads(plan.output.read_text()), f"stage {stage.name}: eval of {job.target}")


def _print_plan(jobs: list[_Job]) -> None:
    rows = [("stage", "kind", "output", "key", "action", "directory")]
    rows += [(j.stage.name, j.stage.kind, j.output_type, j.plan.key[:8], ACTION_TEXT[j.plan.action], str(j.plan.dir))
             for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _report(jobs: list[_Job], root: Path, name: str, log) -> Path:
    """<root>/report.html over every stage: training runs, model operations' outputs, eval stages' scores."""
    from tunelab.report import write_report
    from tunelab.report.collect import EvalStage

    runs, evals = [], []
    for job in jobs:
        if job.output_type == "evaluation":
            evals.append(EvalStage(job.stage.name, json.loads(job.plan.output.read_text()), model=job.target))
        elif job.output_type in ("model", "adapter"):  # a dataset is no run (the report does not show it yet)
            runs.append(job.plan.dir if _trains(job.stage.kind) else job.plan.output)
    return write_report(runs, root / "report.html", title=f"pipeline {name}", eval_stages=evals,
                        warn=lambda message: log(f"warning: {message}"))


def _trains(kind: str) -> bool:
    from tunelab.config import RECIPE_KINDS, TrainingRecipe

    return issubclass(RECIPE_KINDS.get(kind, TrainingRecipe), TrainingRecipe)


def _operation(stage: Stage, resolved: dict, outputs: dict[str, Path], types: dict[str, str], keys: dict[str, str],
               used: set[str], path: Path, log) -> tuple[Path, Any, str]:
    """(recipe path, validated recipe, key) of a stage that works on saved models (merge). Its recipe file may
    name earlier stages too (`models: ["${a}", "${b}"]`); `set` applies, pipeline-wide --set does not (it is
    for training stages). The key covers the resolved recipe, the stages it names, its eval data and the
    weights of every model from outside the pipeline."""
    from tunelab.config import RECIPE_KINDS, RECIPES_DIR
    from tunelab.runs import weight_files_sha256
    from tunelab.paths import resolve_cache_dir

    target = resolved["target"]
    shipped = RECIPES_DIR / f"{stage.kind}s" / f"{target}.yaml"  # a kind's own shipped recipes: recipes/merges/
    local = (path.parent / target).is_file() or Path(target).is_file()
    recipe_path = shipped if shipped.is_file() and not local else _recipe_path(target, path.parent)
    cls = RECIPE_KINDS[stage.kind]
    data = _substitute(read_yaml(recipe_path), outputs, types, stage.name, used)
    data = getattr(cls, "expand_shorthands", lambda d: d)(data)
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in resolved["set"].items()])
    source = f"{path} stage {stage.name}"
    if data.get("kind") not in (None, stage.kind):
        raise ConfigError(f"{source}: {recipe_path} is a {data['kind']!r} recipe; name it as `{data['kind']}:` here")
    cfg = validate({**data, "kind": stage.kind}, source, cls)
    produced = {str(out) for out in outputs.values()}
    outside = {}
    for model in cfg.model_paths():
        where = Path(model).expanduser()
        if model not in produced and where.is_dir():
            run_final = (where / "final").is_dir() and not (where / "config.json").is_file()
            outside[model] = weight_files_sha256(where / "final" if run_final else where)
    key = stage_key({"recipe": dump_config(cfg), "upstream": {ref: keys[ref] for ref in sorted(used)},
                     "data": data_hashes(cfg.data_sources(), resolve_cache_dir(), log, produced), "models": outside})
    return recipe_path, cfg, key


def _recipe_path(name: str, base: Path) -> Path:
    candidate = base / name
    return candidate if candidate.is_file() else resolve_recipe_path(name)
