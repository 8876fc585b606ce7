"""lineage.json: where a model came from. The one writer (`make` + `write`) and the one reader (`read`).

Schema, version 2 (every stage writes it: training stages, merge, prune, export, average):

    schema_version  2
    stage           what made it: pretrain | finetune | merge | prune | export | average
    name            the run's or the operation's name
    parents         [{role, path?, weights_sha256?, ...}]: role says how the parent was used (init,
                    merge-input, base, pruned-from, model, adapter, average). Hashes, where known:
                    weights_sha256 (runs.weight_files_sha256 of the weight files on disk),
                    weights_sha256_in_memory (models.weights_sha256 of the loaded state dict: what a
                    resumed run or an adapter's base is checked against), file_sha256 (one file's sha256,
                    as a checkpoint manifest records it)
    method          {name, ...}: the training method, or the operation's method and options
    tokenizer       {source, fingerprint}                      (optional)
    data            [{source, domain, content_hash, role, eval_fraction, ...}]: what it trained on
    eval_data       [...]: sources only scored                 (training stages)
    ... fields of one stage (export: merged; average: run, config_from, tokenizer_from)

Records written before the version field (version 1) are normalised once, in `read`, so no reader
papers over the differences: an export's `kind` -> `stage` (and its name from its directory), its
parents' hashes (the in-memory hash it stored as weights_sha256) -> weights_sha256_in_memory, a
parent's `sha256` (one file's) -> file_sha256, an adapter_base's weights_sha256 (in-memory) ->
weights_sha256_in_memory, a single `parent` -> `parents`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA_VERSION = 2
FILE = "lineage.json"


def make(stage: str, name: str, parents: list[dict], **fields) -> dict:
    """A lineage record of the current schema (fields with value None are left out)."""
    return {"schema_version": SCHEMA_VERSION, "stage": stage, "name": name, "parents": parents,
            **{k: v for k, v in fields.items() if v is not None}}


def write(directory: str | Path, record: dict) -> Path:
    """Write `record` as directory/lineage.json (replaced atomically)."""
    assert record.get("schema_version") == SCHEMA_VERSION and record.get("stage"), "build records with make()"
    path = Path(directory) / FILE
    tmp = path.with_name(f".{FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read(directory: str | Path) -> dict | None:
    """directory/lineage.json in the current schema (older records normalised); None if absent or unreadable."""
    try:
        record = json.loads((Path(directory) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return normalize(record, Path(directory).name) if isinstance(record, dict) else None


def normalize(record: dict, dir_name: str | None = None) -> dict:
    """A record of any version in the current schema (a new dict; the file is never rewritten)."""
    if record.get("schema_version", 1) >= SCHEMA_VERSION:
        return record
    out = dict(record)
    parents = out.pop("parents", None) or ([out.pop("parent")] if out.get("parent") else [])
    out.pop("parent", None)
    export = "stage" not in out and out.get("kind") == "export"
    if export:
        out["stage"] = out.pop("kind")
    out.setdefault("name", dir_name)
    fixed = []
    for parent in parents:
        if not isinstance(parent, dict):
            continue
        parent = dict(parent)
        if export and "weights_sha256" in parent:  # version 1 exports stored the loaded state dict's hash there
            parent["weights_sha256_in_memory"] = parent.pop("weights_sha256")
        if "sha256" in parent:  # one file's sha256: an adapter's weights, a checkpoint's model.safetensors
            parent["file_sha256"] = parent.pop("sha256")
        base = parent.get("adapter_base")
        if isinstance(base, dict) and "weights_sha256" in base:  # a merge input's adapter base: in-memory too
            parent["adapter_base"] = {"path": base.get("path"), "weights_sha256_in_memory": base["weights_sha256"]}
        fixed.append(parent)
    return {"schema_version": SCHEMA_VERSION, "stage": out.pop("stage", None), "name": out.pop("name"),
            "parents": fixed, **out}


def digest(parent: dict) -> str | None:
    """The hash a parent entry identifies its weights by (the on-disk one first)."""
    return parent.get("weights_sha256") or parent.get("file_sha256") or parent.get("weights_sha256_in_memory")
