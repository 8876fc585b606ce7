"""The `average` stage (`tunelab average`, `average:` in pipelines): a run's checkpoints in, their uniform
mean (LAWA, ops/average.py) out as a plain HF model directory, in the operation scaffold (ops/operation.py).

lineage.json names every checkpoint with its step, the sha256 its manifest recorded and its weight;
average.json the checkpoints and, when the recipe's eval names sources, the held-out loss of the newest
checkpoint and of the average (eval/scoring.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.config import AverageRecipe, validate
from tunelab.errors import ModelError


def cli_recipe(run: str | Path, last: int | None = None, steps: list[int] | None = None,
               name: str = "average") -> AverageRecipe:
    """`tunelab average RUN --last K | --steps A,B`."""
    return validate({"kind": "average", "name": name, "run": str(run), "last": last, "steps": steps}, "average",
                    AverageRecipe)


def run_average(cfg: AverageRecipe, out=None, resume: bool = False, quiet: bool = False, log=None) -> Path:
    """Average the recipe's checkpoints into `out` (default runs/<name>). With resume, a finished one is kept."""
    from tunelab.eval.scoring import render_before_after
    from tunelab.ops import average, operation

    log = (lambda *a: None) if quiet else (log or print)
    out, done = operation.output_dir(out, cfg.name, "average", resume, log)
    if done:
        return out
    run = Path(cfg.run).expanduser()
    if run.name == "final" and (run.parent / "checkpoints").is_dir():  # ${stage} in a pipeline names final/
        run = run.parent
    # Everything is checked before anything is read in bulk or written.
    chosen = average.select_checkpoints(run, last=cfg.last, steps=cfg.steps, log=log)
    paths = [p for _, p in chosen]
    extra, config_dir, tok_dir = average.model_files(paths, run / "final")
    if config_dir is None or tok_dir is None:
        missing = "config.json" if config_dir is None else "a tokenizer"
        raise ModelError(f"RUN: neither the checkpoints nor {run / 'final'} hold {missing}, needed to make a model "
                         "directory; finish the run (or resume it) so final/ is written, then average")
    manifests = [json.loads((p / "manifest.json").read_text()) for p in paths]
    k = len(chosen)
    log(f"averaging {k} checkpoint{'s' * (k != 1)} of {run} (uniform, weight 1/{k} each): "
        + ", ".join(f"step {s}" for s, _ in chosen))
    for path in paths:
        log(f"  {path}")
    weight_files = [p / "model.safetensors" for p in paths]
    average.check_weight_files(weight_files)
    started = time.time()

    with operation.staged_output(out) as (staged, _):
        average.average_files(weight_files, staged / "model.safetensors")
        for file in extra:
            shutil.copy2(file, staged / file.name)
        record = {"name": cfg.name, "run": str(run.resolve()), "steps": [s for s, _ in chosen]}
        newest = paths[-1] if (paths[-1] / "config.json").is_file() else run / "final"
        scorer = operation.make_scorer(cfg.eval, [newest], log)
        if scorer is not None:
            before, after = scorer(newest), scorer(staged)
            record["eval"] = {**scorer.describe(), "before_model": str(newest.resolve()), "before": before,
                              "after": after}
            log(f"before: {newest}\n" + render_before_after(before, after))
        record.update(seconds=round(time.time() - started, 2), recipe=cfg.model_dump(mode="json"))
        parents = [{"role": "average", "path": str(path.resolve()), "step": step, "weight": 1 / k,
                    "file_sha256": manifest["model.safetensors"]["sha256"]}
                   for (step, path), manifest in zip(chosen, manifests)]
        operation.write_records(staged, "average", cfg.name, parents, "average.json", record,
                                method={"name": "uniform", "k": k}, run=str(run.resolve()),
                                config_from=str(config_dir.resolve()), tokenizer_from=str(tok_dir.resolve()))
    if config_dir != paths[-1] or tok_dir != paths[-1]:
        log(f"config.json from {config_dir}, tokenizer from {tok_dir}")
    log(f"wrote {out}")
    return out
