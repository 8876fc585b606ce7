"""Read documents from a source: built-in corpus, text files/folders, JSONL, parquet, HF datasets.

A source yields a list of documents (strings). Bad input raises DataError with one line that
names the file and the fix; undecodable bytes are replaced and counted, not fatal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tunelab.config import SourceSpec
from tunelab.data.builtin import builtin_documents, content_hash
from tunelab.errors import DataError

TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}


@dataclass
class Documents:
    docs: list[str]
    content_hash: str
    decode_errors: int  # characters replaced because their bytes were not UTF-8


class BinaryFile(Exception):
    pass


def _decode(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise BinaryFile(path)
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Count only replacements the decoder made, not U+FFFD characters present in the file.
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _read_jsonl(path: Path, field: str) -> tuple[list[str], int]:
    docs, errors = [], 0
    text, errors = _decode(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not a JSON object; JSONL needs one object per line") from None
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}:{lineno}: no field {field!r} (has: {keys}); set text_field in the source")
        if isinstance(row[field], str) and row[field].strip():
            docs.append(row[field])
    return docs, errors


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from None
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (has: {', '.join(table.column_names)}); "
                        "set text_field in the source")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str) and t.strip()]


def _read_file(path: Path, field: str) -> tuple[list[str], int]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    if suffix == ".parquet":
        return _read_parquet(path, field), 0
    text, errors = _decode(path)
    return ([text] if text.strip() else []), errors


def _folder_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_hf(spec: SourceSpec) -> list[str]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    where = spec.source.removeprefix("hf:")
    if not Path(where).exists():
        raise DataError(f"{spec.source}: {where} does not exist; hf: sources are local dataset folders")
    try:
        if (Path(where) / "dataset_info.json").exists() or (Path(where) / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(where)
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise DataError(f"{spec.source}: no split {spec.split!r} (has: {', '.join(ds)}); set split")
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(where, split=spec.split)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{spec.source}: cannot load the dataset ({str(err).splitlines()[0][:200]})") from None
    if spec.text_field not in ds.column_names:
        raise DataError(f"{spec.source}: no column {spec.text_field!r} (has: {', '.join(ds.column_names)}); "
                        "set text_field in the source")
    return [t for t in ds[spec.text_field] if isinstance(t, str) and t.strip()]


def read_documents(spec: SourceSpec, cache_dir: Path, log: Callable = print) -> Documents:
    source = spec.source
    if source.startswith("builtin:"):
        docs, digest = builtin_documents(source.split(":", 1)[1], cache_dir)
        return Documents(docs, digest, 0)
    if source.startswith("hf:"):
        docs = _read_hf(spec)
        if not docs:
            raise DataError(f"{source}: the dataset has no non-empty text in {spec.text_field!r}")
        return Documents(docs, content_hash(docs), 0)

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder; check data paths in the recipe or --set data.train=PATH")
    docs, errors = [], 0
    if path.is_dir():
        skipped = 0
        for file in _folder_files(path):
            try:
                file_docs, file_errors = _read_file(file, spec.text_field)
            except BinaryFile:
                skipped += 1
                continue
            docs += file_docs
            errors += file_errors
        if skipped:
            log(f"warning: {source}: skipped {skipped} binary file(s)")
        if not docs:
            raise DataError(f"{source}: the folder holds no non-empty text files; point data at text, "
                            "JSONL or parquet files")
    else:
        try:
            docs, errors = _read_file(path, spec.text_field)
        except BinaryFile:
            raise DataError(f"{source}: looks binary (NUL bytes), not text; give a UTF-8 text, JSONL or "
                            "parquet file") from None
        if not docs:
            raise DataError(f"{source}: is empty (no non-whitespace text); add text or remove the source")
    if errors:
        log(f"warning: {source}: {errors} byte sequence(s) were not valid UTF-8 and were replaced")
    return Documents(docs, content_hash(docs), errors)


def tokenizer_training_texts(specs: list[SourceSpec], cache_dir: Path, max_bytes: int) -> Iterator[str]:
    """Documents round-robin across sources (each represented), up to `max_bytes` of text in total."""
    doc_lists = [read_documents(s, cache_dir, log=lambda *a: None).docs for s in specs]
    budget = max_bytes
    longest = max(len(d) for d in doc_lists)
    for i in range(longest):
        for docs in doc_lists:
            if i < len(docs):
                doc = docs[i][:budget]
                budget -= len(doc)
                yield doc
                if budget <= 0:
                    return
