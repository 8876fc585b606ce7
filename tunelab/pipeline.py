"""`tunelab run PIPELINE.yaml`: stages in order, meeting only through their output directories.

    name: demo
    stages:
      - name: base                      # output: <out>/base (a run directory)
        pretrain: quickstart            # a recipe file (relative to this YAML) or shipped recipe name
        set: {train.max_steps: 50}
      - name: domain
        pretrain: quickstart
        set: {model.path: "${base}", data.train: builtin:code}   # ${stage} = that stage's final model
      - name: score
        eval: "${domain}"               # a model directory
        data: [builtin:prose, builtin:code]

A stage whose output exists for the same resolved config is skipped, so re-running a pipeline
after a crash or an added stage only does the missing work. A stage that was interrupted resumes
from its newest checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.config import (apply_overrides, dump_config, expand_shorthands, read_yaml, resolve_recipe_path,
                            validate)
from tunelab.errors import ConfigError
from tunelab.runs import atomic_write

REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    pretrain: str | None = None  # recipe
    eval: str | None = None  # model directory (or ${stage})
    set: dict[str, Any] = Field(default_factory=dict)
    data: list[str] = Field(default_factory=lambda: ["builtin:prose", "builtin:code", "builtin:tests"])
    seq_len: int = 256
    max_tokens: int | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Stage":
        if (self.pretrain is None) == (self.eval is None):
            raise ValueError("a stage needs exactly one of `pretrain: RECIPE` or `eval: MODEL_DIR`")
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


def _substitute(value: Any, outputs: dict[str, Path], stage: str) -> Any:
    if isinstance(value, str):
        def repl(m):
            ref = m.group(1)
            if ref not in outputs:
                raise ConfigError(f"stage {stage}: ${{{ref}}} names no earlier stage (earlier: {', '.join(outputs) or 'none'})")
            return str(outputs[ref])
        return REF.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, outputs, stage) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, stage) for k, v in value.items()}
    return value


def run_pipeline(path: Path, out: Path | None = None, quiet: bool = False,
                 overrides: list[str] | None = None) -> dict[str, Path]:
    """`overrides` (--set) apply to every pretrain stage, after the stage's own `set`."""
    from tunelab.config import RecipeConfig

    path = Path(path)
    spec = validate(read_yaml(path), str(path), Pipeline)
    root = Path(out) if out else Path("runs") / spec.name
    root.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else print
    outputs: dict[str, Path] = {}  # stage name -> its model directory (final/) or result file

    for stage in spec.stages:
        stage_dir = root / stage.name
        resolved = _substitute(stage.model_dump(), outputs, stage.name)
        if stage.pretrain is not None:
            recipe_path = _recipe_path(resolved["pretrain"], path.parent)
            data = expand_shorthands(read_yaml(recipe_path))
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in resolved["set"].items()]
                                   + list(overrides or []))
            cfg = validate(data, f"{path} stage {stage.name}", RecipeConfig)
            outputs[stage.name] = stage_dir / "final"
            if _done(stage_dir / "config.yaml", dump_config(cfg)) and (stage_dir / "final").is_dir():
                log(f"[{stage.name}] up to date, skipped ({stage_dir})")
                continue
            from tunelab.pretrain import pretrain

            log(f"[{stage.name}] pretrain {recipe_path.name} -> {stage_dir}")
            pretrain(cfg, out=stage_dir, resume=(stage_dir / "config.yaml").exists() and
                     _done(stage_dir / "config.yaml", dump_config(cfg), ignore=("train.max_steps",)),
                     quiet=quiet)
        else:
            result_file = stage_dir / "eval.json"
            outputs[stage.name] = result_file
            fingerprint = json.dumps(resolved, sort_keys=True)
            if _done(stage_dir / "stage.json", fingerprint) and result_file.is_file():
                log(f"[{stage.name}] up to date, skipped ({result_file})")
                continue
            from tunelab.evaluate import evaluate_model

            log(f"[{stage.name}] eval {resolved['eval']} on {', '.join(resolved['data'])}")
            results = evaluate_model(resolved["eval"], resolved["data"], seq_len=stage.seq_len,
                                     max_tokens=stage.max_tokens, log=log)
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(result_file, json.dumps(results, indent=2))
            atomic_write(stage_dir / "stage.json", fingerprint)
    log(f"pipeline {spec.name}: {len(spec.stages)} stages, outputs in {root}")
    return outputs


def _recipe_path(name: str, base: Path) -> Path:
    candidate = base / name
    return candidate if candidate.is_file() else resolve_recipe_path(name)


def _done(saved: Path, current: str, ignore: tuple[str, ...] = ()) -> bool:
    """True when the stage's saved config equals the current one (minus `ignore`d dotted keys)."""
    if not saved.is_file():
        return False
    if not ignore:
        return saved.read_text() == current
    import yaml

    a, b = yaml.safe_load(saved.read_text()), yaml.safe_load(current)
    for key in ignore:
        for d in (a, b):
            *parents, last = key.split(".")
            for p in parents:
                d = d.get(p, {})
            d.pop(last, None)
    return a == b
