"""Self-describing run directories.

runs/<name>/
  config.yaml     resolved recipe (every default filled in)
  metrics.jsonl   one JSON object per event: train steps, evals, resumes
  env.json        package versions, git commit, CPU/GPU
  lineage.json    parent model/run and data sources with content hashes
  checkpoints/    step-N/ (see train/checkpoint.py)
  final/          HF model + tokenizer (or adapter)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunelab import lineage
from tunelab.errors import RunDirError


class RunDir:
    def __init__(self, path: Path, main: bool = True):
        self.path = Path(path)
        self.main = main  # only rank 0 writes

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")

    def log(self, event: dict) -> None:
        if not self.main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps({**event, "time": round(time.time(), 3)}) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        if self.main:
            atomic_write(self.path / name, json.dumps(data, indent=2, default=str))


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a fresh temporary directory beside `out`; when the block succeeds it is renamed to `out`
    (absent or empty: callers check first), so an interrupted write never leaves a half directory there."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_run_dir(path: Path, resume: bool, main: bool = True) -> RunDir:
    """Create a run directory; refuse to reuse one that holds a run unless resuming."""
    run = RunDir(path, main)
    has_run = run.config.exists() or run.checkpoints.exists() or run.final.exists()
    if has_run and not resume:
        raise RunDirError(f"{path} already holds a run: pass --resume to continue it, "
                          "or --out DIR for a new one (nothing was changed)")
    if main:
        run.path.mkdir(parents=True, exist_ok=True)
    return run


def read_metrics(path: Path, warn=None) -> list[dict]:
    """Events in order; after a resume, re-run steps replace the ones logged before the crash.

    A line that is not JSON (the last line of a killed run may be cut short) is skipped; `warn`, if
    given, is called with a one-line message naming the file and line."""
    events: list[dict] = []
    if not Path(path).is_file():
        return events
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if warn is not None:
                where = "its last line, cut short (a run killed mid-write?)" if number == len(lines) else f"line {number}"
                warn(f"{path}: {where} is not valid JSON: ignored")
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "resume":
            events = [e for e in events if e.get("step", 0) <= event["step"] or "step" not in e]
        events.append(event)
    return events


def train_losses(path: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(path) if e.get("event") == "train"}


# ---------------------------------------------------------------- env.json and lineage.json


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("tunelab", "torch", "transformers", "peft", "tokenizers", "datasets", "safetensors", "numpy",
                "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": sys.version.split()[0],
        "packages": versions,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "argv": sys.argv,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weight_files_sha256(model_dir: Path) -> str | None:
    """sha256 over a saved model directory's weight files (safetensors, else .bin); None if it has none."""
    weights = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    return hash_files(weights) if weights else None


def model_lineage(model_cfg, path: str | Path | None = None) -> dict:
    """Where the starting weights came from: a preset, a run's output (final/ or a checkpoint), a local
    dir or a hub id. `path`: the resolved starting directory (init_from), default model.path."""
    path = path if path is not None else model_cfg.path
    if path is not None and str(path).startswith("package:"):  # a model shipped in an installed package
        from tunelab.paths import resolve_model_path

        return {**model_lineage(model_cfg, resolve_model_path(str(path))), "kind": "package", "id": str(path)}
    if path is None:
        return {"kind": "preset", "preset": model_cfg.preset, "overrides": model_cfg.overrides}
    if not Path(path).exists():
        return {"kind": "hub", "id": str(path)}
    path = Path(path).resolve()
    entry = {"kind": "local", "path": str(path), "weights_sha256": weight_files_sha256(path)}
    for parent_run in (path.parent, path.parent.parent):  # a tunelab run's final/ or checkpoints/step-N
        if (parent_run / "lineage.json").is_file():
            entry["run"] = str(parent_run)
            break
    return entry


def _lineage_files(model_dir: Path) -> list[Path]:
    """lineage.json describing a model directory: its own (an export), its run's (final/), or the run of a
    checkpoint (checkpoints/step-N/)."""
    found = []
    for where in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (where / "lineage.json").is_file():
            found.append(where / "lineage.json")
            break
    return found


def _ancestor_records(model_dir: str | Path, max_depth: int = 32):
    """lineage.json records of the model and every model it descends from, nearest first."""
    for _, record in lineage_records(model_dir, max_depth):
        yield record


def lineage_dir(model_dir: str | Path) -> Path | None:
    """The directory whose lineage.json describes a model directory (itself, its run, a checkpoint's run)."""
    found = _lineage_files(Path(model_dir).expanduser())
    return found[0].parent if found else None


def lineage_records(model_dir: str | Path, max_depth: int = 32):
    """(directory holding lineage.json, its record) for the model and every model it descends from,
    nearest first. Walks the chain of parents (runs, exports, adapters' bases, checkpoints, merge inputs)."""
    seen_dirs: set[str] = set()
    todo = [Path(model_dir).expanduser()]
    while todo and len(seen_dirs) < max_depth:
        here = todo.pop(0)
        key = str(here.resolve()) if here.exists() else str(here)
        if key in seen_dirs:
            continue
        seen_dirs.add(key)
        for file in _lineage_files(here):
            record = lineage.read(file.parent)
            if record is None:
                continue
            yield file.parent, record
            todo += [Path(p["path"]) for p in record["parents"] if p.get("path")]


def trained_sources(model_dir: str | Path, max_depth: int = 32) -> dict[str, float | None]:
    """Every data source the model, or any model it descends from, was trained on: content hash ->
    the smallest eval_fraction any of them held out (None when not recorded).

    Scoring a model on such a source uses that held-out split: text none of them trained on, and the
    very text the ancestor itself was scored on (the hash rule holds out a subset for a smaller fraction).
    """
    found: dict[str, float | None] = {}
    for record in _ancestor_records(model_dir, max_depth):
        for d in record.get("data", []):
            if d.get("content_hash"):
                fractions = [f for f in (found.get(d["content_hash"]), d.get("eval_fraction")) if f is not None]
                found[d["content_hash"]] = min(fractions) if fractions else None
    return found


def ancestor_data(model_dir: str | Path, max_depth: int = 32) -> list[dict]:
    """The lineage `data` entries (source, domain, content hash, spec) of every source the model and its
    ancestors trained on, nearest ancestor first, each content hash once."""
    out, hashes = [], set()
    for record in _ancestor_records(model_dir, max_depth):
        for d in record.get("data", []):
            if d.get("content_hash") and d["content_hash"] not in hashes and d.get("source"):
                hashes.add(d["content_hash"])
                out.append(d)
    return out


def ancestor_source_specs(model_dirs: list[str | Path]) -> list[dict]:
    """What the models and their ancestors trained on, as source-spec mappings (the mixture weight left
    out: it belonged to that training), each content hash once: what an operation on saved models
    (a merge's scoring, a prune's calibration) reads when its recipe names no data."""
    found, hashes = [], set()
    for model_dir in model_dirs:
        for d in ancestor_data(model_dir):
            if d["content_hash"] not in hashes:
                hashes.add(d["content_hash"])
                found.append({k: v for k, v in (d.get("spec") or {"source": d["source"]}).items() if k != "weight"})
    return found


def report_interrupt(run_dir: Path, max_steps: int, resume_command: list[str]) -> None:
    """Where an interrupted run stopped and how to continue it (stderr; rank 0 only)."""
    import shlex

    if os.environ.get("RANK", "0") != "0":
        return
    logged = [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e.get("event") == "train"]
    kept = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    where = f"after step {max(logged)} of {max_steps}" if logged else "before its first logged step"
    resume = (f"--resume continues from checkpoint step-{max(kept)}" if kept else
              "no checkpoint yet: --resume starts again from step 0")
    print(f"interrupted {where}: {run_dir} ({resume}); continue with:\n  {shlex.join(resume_command)}", file=sys.stderr)
