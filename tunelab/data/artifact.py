"""Dataset artifacts: documents (text) or rows (chat, preference) in a directory with a manifest. A data
stage (selection, mixing) writes one; a recipe names it as a source like any folder
(`data.train: [{source: DIR}]`, or `${stage}` in a pipeline), and sources.py reads it by its manifest.

    DIR/manifest.json   {"tunelab_dataset": 1, "format": "text"|"chat"|"preference", "rows": N,
                         "content_hash": "<sha256>", "data": "data.jsonl", "lineage": {...}}
    DIR/data.jsonl      one row a line: {"text": "..."} (or a list of {"text", "loss"} segments),
                        {"messages": [{"role", "content"}, ...]}, or {"prompt": [...], "chosen", "rejected"}

The content hash is the one sources.py computes for the same documents (readers.Tally), so the manifest,
the key of a pipeline stage that reads the dataset and that run's lineage all carry the same hash.
`lineage` says what the dataset was made from (its sources and their content hashes, which steps kept or
dropped what, with which settings); the writer stores it as given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.config import validate
from tunelab.data.chat import Chat, PreferencePair
from tunelab.data.readers import Document, Tally, has_text, iter_path
from tunelab.errors import DataError, RunDirError

MANIFEST = "manifest.json"
DATA_FILE = "data.jsonl"
VERSION = 1


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tunelab_dataset: Literal[1]
    format: Literal["text", "chat", "preference"]
    rows: int = Field(ge=1)
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: Literal["data.jsonl"]
    lineage: dict


def is_dataset(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> Manifest:
    """The validated manifest of the dataset at `path`; a one-line error naming the file and the field."""
    file = Path(path) / MANIFEST
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not a dataset (no {MANIFEST}); give a directory a data stage wrote") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{file}: unreadable ({str(err)[:120]}); write the dataset again") from None
    if not isinstance(data, dict):
        raise DataError(f"{file}: a manifest is a JSON object; write the dataset again")
    manifest = validate(data, str(file), Manifest)
    if not (Path(path) / manifest.data).is_file():
        raise DataError(f"{file}: its data file {manifest.data} is missing; write the dataset again")
    return manifest


def _row(doc: Document, fmt: str) -> dict:
    if fmt == "text" and isinstance(doc, str):
        return {"text": doc}
    if fmt == "text" and isinstance(doc, list):
        return {"text": [{"text": text, "loss": loss} for text, loss in doc]}
    if fmt == "chat" and isinstance(doc, Chat):
        return {"messages": [{"role": role, "content": content} for role, content in doc.messages]}
    if fmt == "preference" and isinstance(doc, PreferencePair):
        return {"prompt": [{"role": role, "content": content} for role, content in doc.prompt],
                "chosen": doc.chosen, "rejected": doc.rejected}
    raise TypeError(f"a {type(doc).__name__} is not a document of a {fmt} dataset")


def write_dataset(out, docs: Iterable[Document], fmt: str, lineage: dict) -> Manifest:
    """Write documents (str or (text, loss) segments for text; Chat; PreferencePair) as a dataset at `out`
    (absent or empty), through a staged directory renamed at the end. Blank documents are left out, as
    every reader leaves them out."""
    from tunelab.runs import staged_dir

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} already exists and is not empty: choose a new output (nothing was changed)")
    tally = Tally()
    with staged_dir(out) as staged:
        with open(staged / DATA_FILE, "w", encoding="utf-8") as f:
            for doc in docs:
                if isinstance(doc, list):
                    doc = [(text, loss) for text, loss in doc if text]  # as the reader keeps them
                if not has_text(doc):
                    continue
                f.write(json.dumps(_row(doc, fmt)) + "\n")
                tally.add(doc)
        if not tally.documents:
            raise DataError(f"{out}: no documents left to write (all dropped or blank); nothing was written")
        manifest = Manifest(tunelab_dataset=VERSION, format=fmt, rows=tally.documents,
                            content_hash=tally.content_hash, data=DATA_FILE, lineage=lineage)
        (staged / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    return manifest


def verify_dataset(path) -> Manifest:
    """Read the whole dataset back: its rows and content hash must be the manifest's (else it was edited)."""
    manifest = read_manifest(path)
    tally = Tally()
    for doc in iter_path(str(Path(path) / manifest.data), "text", tally, table_format=manifest.format):
        if has_text(doc):
            tally.add(doc)
    if (tally.documents, tally.content_hash) != (manifest.rows, manifest.content_hash):
        raise DataError(f"{path}: {tally.documents} rows, content hash {tally.content_hash[:12]}..., but the manifest "
                        f"says {manifest.rows}, {manifest.content_hash[:12]}...: edited after it was written?")
    return manifest


def dataset_source(spec):
    """A source (SourceSpec) naming a dataset as a source of its data file, its domain still named after the
    dataset's directory; any other source as it is."""
    if spec.source.startswith(("builtin:", "hf:")) or not is_dataset(Path(spec.source).expanduser()):
        return spec
    path = Path(spec.source).expanduser()
    manifest = read_manifest(path)
    if spec.format != manifest.format:
        raise DataError(f"{spec.source}: a {manifest.format} dataset; set format: {manifest.format} on this source")
    return spec.model_copy(update={"source": str(path / manifest.data), "name": spec.domain, "text_field": "text"})
