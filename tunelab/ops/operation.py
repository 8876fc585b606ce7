"""The scaffold every model operation runs in (merge, prune, export, average; grow and expand-vocab next):
plain functions a stage calls in order (ARCHITECTURE.md, "A model operation"): `output_dir` (never
overwrites; resume keeps a finished one), `resolve_inputs` + `materialize`, `staged_output` (renamed to
`out` only on success, so nothing half-written survives a failure), `make_scorer`, `write_records`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import lineage, tokenizers
from tunelab.errors import ModelError, RunDirError
from tunelab.runs import staged_dir, weight_files_sha256


@dataclass
class ModelInput:
    """One model an operation reads: what the user gave, what it resolved to, and where its weights are."""
    given: str
    path: Path  # a run resolved to its final/
    role: str  # its role in lineage.json: merge-input | base | pruned-from | model
    label: str
    weight: float | None = None
    adapter: bool = False
    model_dir: Path | None = None  # the directory holding config.json + safetensors weights (set by materialize)
    info: dict = field(default_factory=dict)


def output_dir(out, name: str, stage: str, resume: bool, log) -> tuple[Path, bool]:
    """(where the operation writes: `out`, default runs/<name>; whether `resume` finds it already done there).
    A directory that is occupied by anything else is refused: nothing is ever overwritten."""
    out = Path(out).expanduser() if out else Path("runs") / name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if resume and (lineage.read(out) or {}).get("stage") == stage:  # written last, renamed in whole
            log(f"{out}: {stage} already done, kept")
            return out, True
        raise RunDirError(f"{out} already exists and is not empty: choose a new --out (nothing was changed)")
    return out, False


def resolve_input(given: str, role: str, field_name: str) -> ModelInput:
    """A model directory, a tunelab run (-> its final/), a peft adapter, or package:NAME; a one-line error
    for anything else. Reads only small files."""
    from tunelab import models

    path = Path(models.resolve_model_path(str(given), field_name)).expanduser()
    if not path.exists():
        raise ModelError(f"{field_name}: {given} does not exist; give a model directory, a tunelab run (runs/NAME) "
                         "or a LoRA adapter directory")
    if path.is_dir() and not (path / "config.json").is_file() and not models.is_adapter_dir(path) \
            and (path / "final").is_dir():
        path = path / "final"
    adapter = models.is_adapter_dir(path)
    if not adapter and not (path / "config.json").is_file():
        raise ModelError(f"{field_name}: {path} is not a model directory (no config.json); give a model directory, a "
                         "tunelab run or a LoRA adapter directory")
    label = path.parent.name if path.name == "final" else path.name
    return ModelInput(given=str(given), path=path, role=role, label=label, adapter=adapter)


def resolve_inputs(given: list[tuple[str, str, str]]) -> list[ModelInput]:
    """resolve_input for each (path, role, field), labels made unique (a#2) for tables and lineage."""
    items = [resolve_input(*g) for g in given]
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item.label, 0)
        seen[item.label] = n + 1
        if n:
            item.label = f"{item.label}#{n + 1}"
    return items


def materialize(item: ModelInput, work: Path, log=print, copy: bool = False, base: str | None = None) -> None:
    """Point item.model_dir at safetensors weights: the directory itself, or (an adapter, a model saved without
    safetensors, or any model with `copy`) a model directory in `work`, loaded (adapters merged onto their
    base, checked against the base hash recorded at training; `base` overrides where it is) and saved once."""
    from tunelab import models
    from tunelab.ops.safetensors_io import weight_files

    if not item.adapter and not copy and weight_files(item.path):
        item.model_dir = item.path
        return
    if not copy:
        what = "adapter: merging it onto its base" if item.adapter else "no safetensors weights: converting"
        log(f"{item.label}: {what} ({item.path})")
    if item.adapter:
        model, base_path, base_hash = models.load_adapter(str(item.path), field=item.given, merge=True, base=base)
        where = Path(base_path).expanduser()
        item.info["adapter_base"] = {"path": str(where.resolve()) if where.exists() else base_path,
                                     "weights_sha256_in_memory": base_hash}
    else:
        model = models.load_model(str(item.path), field=item.given)
    target = work / f"input-{item.label.replace('#', '-')}"
    model.save_pretrained(target, safe_serialization=True)
    tokenizers.load_tokenizer(str(item.path), item.given).save_pretrained(target)
    del model
    item.model_dir = target


@contextlib.contextmanager
def staged_output(out: Path):
    """(staged, work): the output is written into `staged` beside `out` and renamed to `out` when the block
    succeeds (removed on any error); `work` inside it is scratch space, removed before the rename."""
    with staged_dir(out) as staged:
        work = staged / ".work"
        work.mkdir()
        yield staged, work
        shutil.rmtree(work)


def make_scorer(eval_cfg, model_dirs: list, log, calibrated: dict | None = None):
    """The one Scorer (eval/scoring.py) for the recipe's `eval` section, or None when it asks for none."""
    from tunelab.eval.scoring import Scorer

    return None if eval_cfg.data == [] else Scorer(eval_cfg, model_dirs, log, calibrated)


def parent_entry(item: ModelInput, **extra) -> dict:
    """A lineage parent for a resolved input: role, path, label, the hash of its weight files on disk, the
    base an adapter was merged onto."""
    entry = {"role": item.role, "path": str(item.path.resolve()), "label": item.label,
             "weights_sha256": weight_files_sha256(item.path), **extra}
    if item.adapter:
        entry["adapter_base"] = item.info.get("adapter_base")
    return entry


def tokenizer_entry(item: ModelInput, tokenizer) -> dict:
    return {"source": str(item.path.resolve()), "fingerprint": tokenizers.tokenizer_fingerprint(tokenizer)}


def write_records(staged: Path, stage: str, name: str, parents: list[dict], record_file: str | None = None,
                  record: dict | None = None, **lineage_fields) -> None:
    """The operation's own record (merge.json ...), then lineage.json (the one schema, tunelab/lineage.py):
    written last, it marks the output finished."""
    if record_file is not None:
        (staged / record_file).write_text(json.dumps(record, indent=2, default=str) + "\n")
    lineage.write(staged, lineage.make(stage, name, parents, **lineage_fields))
