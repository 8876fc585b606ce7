"""Stage keys: reuse a stage's output, resume it, or make it again in a fresh directory.

A stage's key is the hash of everything its output depends on: its resolved recipe, the keys of the
stages it reads from, the content hashes of its data (and the weights of models from outside).
`plan_stage(root, name, key, output)` finds the stage's directory under `root` and what to do there:

    skip    <dir>/stage.json holds this key, status done, and the output is there
    resume  <dir>/stage.json holds this key but the stage did not finish (interrupted)
    run     new: <root>/<name> is free
    stale   <root>/<name> holds another key (the recipe, the data or an upstream stage changed): the
            stage runs into <root>/<name>.<key[:8]>, so no earlier output is ever overwritten

`Plan.begin` / `Plan.finish` record the key and status. `tunelab run` (pipeline.py) and the lottery's
rounds (stages/lottery.py) share this; it lives in the library layer beside runs.py, so a stage and a
command both import it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tunelab.errors import ConfigError
from tunelab.runs import atomic_write

RECORD = "stage.json"
ACTIONS = ("skip", "resume", "run", "stale")


def stage_key(parts: dict) -> str:
    """sha256 of the parts as canonical JSON (paths and other objects by their str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_hashes(sources: Iterable, cache_dir: Path, log: Callable = print, produced: Iterable[str] = ()) -> dict:
    """Content hash per source (SourceSpec). A source another stage produces is left out: that stage's key,
    which the reader's key holds, already stands for it (and it may not exist yet)."""
    from tunelab.data import source_content_hash

    produced = set(produced)
    return {s.source: source_content_hash(s, cache_dir, log=log) for s in sources if s.source not in produced}


def read_record(stage_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(stage_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Plan:
    dir: Path
    key: str
    output: Path  # what the stage leaves in dir: final/, dataset/, eval.json
    action: str  # one of ACTIONS

    def begin(self, **info) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / RECORD, json.dumps({"key": self.key, **info, "status": "running"}))

    def finish(self, **info) -> None:
        atomic_write(self.dir / RECORD, json.dumps({"key": self.key, **info, "status": "done"}))


def _free(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def plan_stage(root: Path, name: str, key: str, output: str) -> Plan:
    """Where the stage with this key goes under root, and whether it is skipped, resumed or run (see above)."""
    root = Path(root)
    for candidate in (root / name, root / f"{name}.{key[:8]}"):
        record = read_record(candidate)
        if record is not None and record.get("key") == key:
            done = record.get("status") == "done" and (candidate / output).exists()
            return Plan(candidate, key, candidate / output, "skip" if done else "resume")
        if _free(candidate):
            return Plan(candidate, key, candidate / output, "run" if candidate.name == name else "stale")
    raise ConfigError(f"{root / name}.{key[:8]} exists but holds another stage: move it away")
