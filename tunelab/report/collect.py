"""What the report shows about each run, read from its directory (no torch, nothing loaded).

An entry is a directory that describes itself: a training run (metrics.jsonl, config.yaml,
env.json, lineage.json) or a model written by an operation (a merge's final/: lineage.json and
merge.json, no metrics). A pipeline's eval stages (eval.json) are kept apart: they score a model
and have no curves.
"""

from __future__ import annotations

import glob
import json
import statistics
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tunelab.errors import RunDirError
from tunelab import lineage
from tunelab.runs import read_metrics

RECORDS = ("metrics.jsonl", "config.yaml", "lineage.json")
OP_RECORDS = ("merge.json", "prune.json")  # a model operation's own record beside its lineage.json
HINT = ("give run directories (runs/NAME, written by tunelab pretrain/finetune), a pipeline's output folder, "
        "or a shell glob such as 'runs/*'")


PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")  # runs from before the `objective:` section name them as a method


def objective_of(config: dict) -> str:
    """A run's training objective from its config.yaml: `objective.name` (today's shape), else a preference
    method's name (older runs: `method: {name: dpo, options: {tuning: ...}}`), else `train.objective`, else clm."""
    new = config.get("objective")
    if isinstance(new, dict) and new.get("name"):
        return str(new["name"])
    method = config.get("method")
    method = method.get("name") if isinstance(method, dict) else method
    if method in PREFERENCE_OBJECTIVES:
        return method
    return str((config.get("train") or {}).get("objective") or "clm")


@dataclass
class EvalStage:
    """A pipeline eval stage: one model scored on some domains (eval.json; its "model" entry, when written,
    names the model scored: {"path", "weights_sha256"})."""
    name: str
    results: dict
    model: str | None = None
    model_sha256: str | None = None

    def __post_init__(self):
        record = self.results.get("model")
        if isinstance(record, dict):
            self.results = {k: v for k, v in self.results.items() if k != "model"}
            self.model = self.model or record.get("path")
            self.model_sha256 = record.get("weights_sha256")


@dataclass
class Entry:
    path: Path
    label: str = ""
    index: int = 0  # colour and anchor
    events: list = field(default_factory=list)
    config_text: str | None = None
    env: dict | None = None
    lineage: dict | None = None
    op_record: dict | None = None  # merge.json / prune.json
    op_kind: str | None = None

    @property
    def anchor(self) -> str:
        return f"run-{self.index}"

    @cached_property  # read after load() has set the events; the page asks for these many times
    def train(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "train" and "step" in e]

    @cached_property
    def evals(self) -> dict[str, list[dict]]:
        """domain -> eval events in step order (after a resume, the re-run ones)."""
        out: dict[str, list[dict]] = {}
        for e in self.events:
            if e.get("event") == "eval" and "domain" in e and "step" in e:
                out.setdefault(e["domain"], []).append(e)
        return {d: sorted(v, key=lambda e: e["step"]) for d, v in out.items()}

    @property
    def has_metrics(self) -> bool:
        return bool(self.train or self.evals)

    @property
    def samples(self) -> list[dict]:
        """Recorded generations ({"event": "sample", "step", "prompt", "text"}), the last per (step, prompt)."""
        found = {}
        for e in self.events:
            if e.get("event") == "sample" and "text" in e:
                found[(e.get("step"), e.get("prompt"))] = e
        return list(found.values())

    @property
    def tokenizer(self) -> str | None:
        return ((self.lineage or {}).get("tokenizer") or {}).get("fingerprint")

    @property
    def stage(self) -> str:
        lin = self.lineage or {}
        return lin.get("stage") or self.op_kind or ("run" if self.events else "model")

    @cached_property
    def objective(self) -> str | None:
        """clm, mlm, dpo, ... from config.yaml (objective_of); None without one (a merge's output)."""
        import yaml

        try:
            config = yaml.safe_load(self.config_text) if (self.path / "config.yaml").is_file() else None
        except yaml.YAMLError:
            config = None
        return objective_of(config) if isinstance(config, dict) else None

    @property
    def method(self) -> str | None:
        method = (self.lineage or {}).get("method")
        if isinstance(method, dict):
            return method.get("name")
        return method if isinstance(method, str) else None


# ---------------------------------------------------------------- which directories


def _kind(path: Path) -> str | None:
    """run | op-stage (a pipeline operation stage: <stage>/final holds the model) | eval | None."""
    if path.is_dir():
        if any((path / name).is_file() for name in RECORDS):
            return "run"
        if (path / "final" / "lineage.json").is_file():
            return "op-stage"
        if (path / "eval.json").is_file():
            return "eval"
    return None


def expand(args: list[str | Path], warn=None) -> tuple[list[Path], list[EvalStage]]:
    """Run directories (and eval stages) named by the arguments: directories, globs (also quoted ones,
    expanded here), or folders holding runs (a pipeline's output, runs/). What a glob matches that is not a
    run (runs/quickstart-report.html beside the runs) is skipped, with a note to `warn`; an argument that
    names no run at all raises RunDirError."""
    found: dict[str, Path] = {}  # by resolved path: a run named twice is listed once
    evals: list[EvalStage] = []

    def runs_in(path: Path) -> list[tuple[Path, str]]:
        if path.is_file() and path.name in ("metrics.jsonl", "lineage.json", "config.yaml"):
            path = path.parent
        inside = [path] if _kind(path) else sorted(c for c in path.iterdir() if c.is_dir()) if path.is_dir() else []
        return [(c, _kind(c)) for c in inside if _kind(c)]

    for arg in args:
        text = str(arg)
        path = Path(text).expanduser()
        if path.exists() or not any(ch in text for ch in "*?["):
            if not path.exists():
                raise RunDirError(f"RUN: {path} does not exist; {HINT}")
            named = runs_in(path)
            if not named:
                raise RunDirError(f"RUN: {path} is not a run directory (no metrics.jsonl, config.yaml or "
                                  f"lineage.json) and holds none; {HINT}")
        else:
            matches = [(Path(p), runs_in(Path(p))) for p in sorted(glob.glob(str(path)))]
            named = [run for _, runs in matches for run in runs]
            if not named:
                raise RunDirError(f"RUN: {text} matches {'no run directory' if matches else 'nothing'}; {HINT}")
            skipped = [match.name for match, runs in matches if not runs]
            if skipped and warn is not None:
                warn(f"{text}: skipped what is not a run directory: {', '.join(skipped)}")
        for where, kind in named:
            if kind == "eval":
                evals.append(EvalStage(where.name, _read_json(where / "eval.json") or {}))
            else:
                where = where / "final" if kind == "op-stage" else where
                found.setdefault(str(where.resolve()), where)
    return list(found.values()), evals


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _labels(paths: list[Path]) -> list[str]:
    """The directory name (a model's final/ is named by its stage or run); the parent is added where two
    runs share a name."""
    names = [p.parent.name if p.name == "final" else p.name for p in paths]
    out = []
    for name, path in zip(names, paths):
        where = path.parent.parent if path.name == "final" else path.parent
        out.append(name if names.count(name) == 1 else f"{where.name}/{name}")
    return out


def load(paths: list[Path], warn) -> list[Entry]:
    entries = []
    for i, (path, label) in enumerate(zip(paths, _labels(paths))):
        entry = Entry(path=path, label=label, index=i)
        entry.events = read_metrics(path / "metrics.jsonl", warn=warn)
        if (path / "config.yaml").is_file():
            entry.config_text = (path / "config.yaml").read_text()
        entry.env = _read_json(path / "env.json")
        entry.lineage = lineage.read(path)
        for name in OP_RECORDS:
            record = _read_json(path / name)
            if record is not None:
                entry.op_record, entry.op_kind = record, name.removesuffix(".json")
                if entry.config_text is None and isinstance(record.get("recipe"), dict):
                    import yaml

                    entry.config_text = yaml.safe_dump(record["recipe"], sort_keys=False)
        if not entry.has_metrics and entry.op_record is None:
            why = "metrics.jsonl is missing" if not (path / "metrics.jsonl").is_file() else "metrics.jsonl has no events"
            warn(f"{path}: no metrics ({why}): listed without curves")
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- the comparison table's numbers


def safetensors_params(directory: Path) -> int | None:
    """Elements in a directory's weight files (model*.safetensors, else an adapter's adapter_model*.safetensors;
    never a pruned model's masks.safetensors), from their JSON headers alone."""
    files = sorted(Path(directory).glob("model*.safetensors")) or sorted(Path(directory).glob("adapter_model*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
            return None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                count = 1
                for dim in info.get("shape", []):
                    count *= dim
                total += count
    return total


def wall_seconds(events: list[dict]) -> float | None:
    """Seconds the run spent working: from its start (the `model` event, else the first log step less its
    own duration) to its last event, without the time between a crash and its resume."""
    timed = [e for e in events if isinstance(e.get("time"), (int, float))]
    if not timed:
        return None
    total = 0.0
    for before, after in zip(timed, timed[1:]):
        if after.get("event") != "resume":
            total += max(0.0, after["time"] - before["time"])
    first = timed[0]
    if first.get("event") == "train" and first.get("tokens_per_s") and first.get("tokens"):
        total += first["tokens"] / first["tokens_per_s"]  # the steps before the first log line
    return total if total > 0 else None


def summary(entry: Entry) -> dict:
    """The comparison table's row: stage, method, sizes, steps, tokens, time, speed, precision."""
    model_event = next((e for e in reversed(entry.events) if e.get("event") == "model"), None)
    params = trainable = None
    if model_event is not None:
        params, trainable = model_event.get("parameters"), model_event.get("trainable")
    else:  # a run from before the model event, or a model operation's output: count from the weights' headers
        final = entry.path / "final" if (entry.path / "final").is_dir() else entry.path
        if (final / "adapter_config.json").is_file():
            trainable = safetensors_params(final)
        else:
            params = safetensors_params(final)
            if entry.method == "full":
                trainable = params
    train = entry.train
    last_train = train[-1] if train else None
    steps = max([e["step"] for e in train] + [e["step"] for v in entry.evals.values() for e in v], default=None)
    tokens = last_train.get("tokens") if last_train else None
    speeds = [e["tokens_per_s"] for e in train if isinstance(e.get("tokens_per_s"), (int, float))]
    precision = ((entry.env or {}).get("precision") or {}).get("used")
    if precision is None and entry.config_text and "precision:" in entry.config_text:
        precision = entry.config_text.split("precision:", 1)[1].split()[0]
    return {"stage": entry.stage, "method": entry.method, "parameters": params, "trainable": trainable,
            "steps": steps, "tokens": tokens, "wall_s": wall_seconds(entry.events) if entry.has_metrics else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None, "precision": precision,
            "train_loss": last_train.get("loss") if last_train else None, "tokenizer": entry.tokenizer}
