"""`tunelab run PIPELINE.yaml`: stages in order, meeting only through their output directories.

    name: demo
    stages:
      - name: base                      # output: <out>/base (a run directory)
        pretrain: quickstart            # any training kind (pretrain, finetune, ...): a recipe file
        set: {train.max_steps: 50}      #   (relative to this YAML) or a shipped recipe name
      - name: code-lora
        finetune: lora-code
        set: {model.path: "${base}"}    # ${stage} = that stage's final model (or eval.json);
                                        # init_from: "${base}" continues that run (its final/)
      - name: score
        eval: "${code-lora}"            # a model or adapter directory
        data: [builtin:prose, builtin:code]
      - name: soup                      # a model operation; output: <out>/soup/final
        merge: merge-soup               # its recipe may name earlier stages too
        set: {models: ["${base}", "${code-lora}"]}

Each stage has a key: the hash of its resolved recipe, the keys of the stages it names and the
content hashes of its data (and of an outside model.path). A stage whose directory holds a
finished output with the same key is skipped; one interrupted with the same key resumes. When
the key changed (its recipe, its data, or an upstream stage was retrained), the stage runs again
into a fresh directory `<name>.<key[:8]>`, so no earlier output is overwritten, and everything
downstream re-runs with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.config import (apply_overrides, dump_config, expand_shorthands, read_yaml, resolve_recipe_path,
                            validate, validate_recipe)
from tunelab.errors import ConfigError
from tunelab.runs import atomic_write

REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
EVAL_KIND = "eval"


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


def _substitute(value: Any, outputs: dict[str, Path], stage: str, used: set[str]) -> Any:
    if isinstance(value, str):
        def repl(m):
            ref = m.group(1)
            if ref not in outputs:
                raise ConfigError(f"stage {stage}: ${{{ref}}} names no earlier stage "
                                  f"(earlier: {', '.join(outputs) or 'none'})")
            used.add(ref)
            return str(outputs[ref])
        return REF.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, outputs, stage, used) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, stage, used) for k, v in value.items()}
    return value


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _data_hashes(sources: list, cache: Path, log) -> dict:
    from tunelab.data import source_content_hash

    return {s.source: source_content_hash(s, cache, log=log) for s in sources}


def _stage_dir(root: Path, name: str, key: str) -> Path:
    """<root>/<name> when free or holding this key; else <root>/<name>.<key[:8]> (never overwritten)."""
    for candidate in (root / name, root / f"{name}.{key[:8]}"):
        record = candidate / "stage.json"
        if not candidate.exists() or (record.is_file() and json.loads(record.read_text()).get("key") == key):
            return candidate
        if candidate.is_dir() and not any(candidate.iterdir()):
            return candidate
    raise ConfigError(f"{root / name}.{key[:8]} exists but holds another stage: move it away")


def run_pipeline(path: Path, out: Path | None = None, quiet: bool = False,
                 overrides: list[str] | None = None) -> dict[str, Path]:
    """`overrides` (--set) apply to every training stage, after the stage's own `set`."""
    from tunelab.runs import weight_files_sha256
    from tunelab.stages import run_stage
    from tunelab.paths import resolve_cache_dir

    path = Path(path)
    spec = validate(read_yaml(path), str(path), Pipeline)
    root = Path(out) if out else Path("runs") / spec.name
    root.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else print
    outputs: dict[str, Path] = {}  # stage name -> its final model directory, or eval.json
    keys: dict[str, str] = {}
    targets: dict[str, str] = {}  # stage name -> its resolved target (for the report: what an eval stage scored)

    for stage in spec.stages:
        used: set[str] = set()
        resolved = _substitute(stage.model_dump(), outputs, stage.name, used)
        upstream = {ref: keys[ref] for ref in sorted(used)}
        if stage.kind == EVAL_KIND:
            from tunelab.config import SourceSpec, _as_source_list

            sources = [validate(s, f"{path} stage {stage.name}: data", SourceSpec) for s in _as_source_list(resolved["data"])]
            cache = resolve_cache_dir()
            key = _key({"stage": resolved, "upstream": upstream, "data": _data_hashes(sources, cache, log)})
        elif not _trains(stage.kind):  # a model operation (merge): ${stage} may also appear in its recipe
            recipe_path, cfg, key = _operation(stage, resolved, outputs, keys, used, path, log)
            upstream = {ref: keys[ref] for ref in sorted(used)}
        else:
            recipe_path = _recipe_path(resolved["target"], path.parent)
            data = expand_shorthands(read_yaml(recipe_path))
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in resolved["set"].items()]
                                   + list(overrides or []))
            cfg = validate_recipe(data, f"{path} stage {stage.name}", kind=stage.kind)
            cache = resolve_cache_dir(cfg.data.cache_dir)
            model_path = cfg.model.path or cfg.init_from
            outside = model_path and not any(str(outputs[r]) == model_path for r in used) and Path(model_path).is_dir()
            if outside and cfg.init_from:  # a run or checkpoint from outside: hash the weights it gives
                from tunelab.stages.setup import resolve_init

                model_path = str(resolve_init(cfg).model_dir)
            replay = cfg.data.replay.sources if cfg.data.replay else []
            key = _key({"recipe": dump_config(cfg), "upstream": upstream,
                        "data": _data_hashes(cfg.data.train + cfg.data.eval + replay, cache, log),
                        "model": weight_files_sha256(Path(model_path)) if outside else None})
        stage_dir = _stage_dir(root, stage.name, key)
        keys[stage.name] = key
        record = stage_dir / "stage.json"
        done = record.is_file() and json.loads(record.read_text()).get("status") == "done"
        outputs[stage.name] = stage_dir / ("eval.json" if stage.kind == EVAL_KIND else "final")
        targets[stage.name] = resolved["target"]
        if done and outputs[stage.name].exists():
            log(f"[{stage.name}] up to date, skipped ({stage_dir})")
            continue
        started = record.is_file()
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(record, json.dumps({"key": key, "kind": stage.kind, "upstream": upstream, "status": "running"}))
        if stage.kind == EVAL_KIND:
            from tunelab.evaluate import evaluate_model

            log(f"[{stage.name}] eval {resolved['target']} on {', '.join(resolved['data'])}")
            results = evaluate_model(resolved["target"], resolved["data"], seq_len=stage.seq_len,
                                     max_tokens=stage.max_tokens, split=stage.split, log=log)
            atomic_write(outputs[stage.name], json.dumps(results, indent=2))
        else:
            log(f"[{stage.name}] {stage.kind} {recipe_path.name} -> {stage_dir}")
            trains = _trains(stage.kind)  # an operation writes its model straight to <stage>/final
            run_stage(cfg, out=stage_dir if trains else outputs[stage.name],
                      resume=started and (not trains or (stage_dir / "config.yaml").exists()), quiet=quiet)
        atomic_write(record, json.dumps({"key": key, "kind": stage.kind, "upstream": upstream, "status": "done"}))
    report = _report(spec, outputs, targets, root, log)
    log(f"pipeline {spec.name}: {len(spec.stages)} stages, outputs in {root}; report: {report}")
    return outputs


def _report(spec: Pipeline, outputs: dict[str, Path], targets: dict[str, str], root: Path, log) -> Path:
    """<root>/report.html over every stage: training runs, model operations' outputs, eval stages' scores."""
    from tunelab.report import write_report
    from tunelab.report.collect import EvalStage

    runs, evals = [], []
    for stage in spec.stages:
        out = outputs[stage.name]
        if stage.kind == EVAL_KIND:
            evals.append(EvalStage(stage.name, json.loads(out.read_text()), model=targets[stage.name]))
        else:
            runs.append(out.parent if _trains(stage.kind) else out)
    return write_report(runs, root / "report.html", title=f"pipeline {spec.name}", eval_stages=evals,
                        warn=lambda message: log(f"warning: {message}"))


def _trains(kind: str) -> bool:
    from tunelab.config import RECIPE_KINDS, TrainingRecipe

    return issubclass(RECIPE_KINDS.get(kind, TrainingRecipe), TrainingRecipe)


def _operation(stage: Stage, resolved: dict, outputs: dict[str, Path], keys: dict[str, str], used: set[str],
               path: Path, log) -> tuple[Path, Any, str]:
    """(recipe path, validated recipe, key) of a stage that works on saved models (merge). Its recipe file may
    name earlier stages too (`models: ["${a}", "${b}"]`); `set` applies, pipeline-wide --set does not (it is
    for training stages). The key covers the resolved recipe, the stages it names, its eval data and the
    weights of every model from outside the pipeline."""
    from tunelab.config import RECIPE_KINDS
    from tunelab.runs import weight_files_sha256
    from tunelab.paths import resolve_cache_dir

    from tunelab.config import RECIPES_DIR

    target = resolved["target"]
    shipped = RECIPES_DIR / f"{stage.kind}s" / f"{target}.yaml"  # a kind's own shipped recipes: recipes/merges/
    local = (path.parent / target).is_file() or Path(target).is_file()
    recipe_path = shipped if shipped.is_file() and not local else _recipe_path(target, path.parent)
    cls = RECIPE_KINDS[stage.kind]
    data = _substitute(read_yaml(recipe_path), outputs, stage.name, used)
    data = getattr(cls, "expand_shorthands", lambda d: d)(data)
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in resolved["set"].items()])
    source = f"{path} stage {stage.name}"
    if data.get("kind") not in (None, stage.kind):
        raise ConfigError(f"{source}: {recipe_path} is a {data['kind']!r} recipe; name it as `{data['kind']}:` here")
    cfg = validate({**data, "kind": stage.kind}, source, cls)
    produced = {str(outputs[r]) for r in used}
    outside = {}
    for model in cfg.model_paths():
        where = Path(model).expanduser()
        if model not in produced and where.is_dir():
            run_final = (where / "final").is_dir() and not (where / "config.json").is_file()
            outside[model] = weight_files_sha256(where / "final" if run_final else where)
    key = _key({"recipe": dump_config(cfg), "upstream": {ref: keys[ref] for ref in sorted(used)},
                "data": _data_hashes(cfg.data_sources(), resolve_cache_dir(), log), "models": outside})
    return recipe_path, cfg, key


def _recipe_path(name: str, base: Path) -> Path:
    candidate = base / name
    return candidate if candidate.is_file() else resolve_recipe_path(name)
