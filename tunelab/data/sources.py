"""Read the documents of one source: the built-in corpus, text files and folders, JSONL, parquet, HF datasets.

    builtin:prose|code|tests   the stdlib corpus (tunelab.data.builtin)
    notes.txt, README.md, ...  one document per file
    folder/                    every file under it, recursively, in sorted order, each one document;
                               hidden files and folders are skipped, binary files are skipped with a
                               warning, .jsonl and .parquet files inside are read as tables (a .json
                               file inside a folder is usually a config, so it counts as text)
    data.jsonl / data.json     JSON Lines: one object per line, the document under `text_field`
    data.parquet               the column `text_field`
    hf:<dir>                   a local HF dataset: a `save_to_disk` folder or a folder of data files

Bad input raises DataError with one line naming the source and the fix. Bytes that are not UTF-8
are replaced by U+FFFD and counted (a warning, not an error): one bad byte must not stop a run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tunelab.config import SourceSpec
from tunelab.data.builtin import content_hash
from tunelab.errors import DataError

JSON_SUFFIXES = {".jsonl", ".json"}  # a single file given by name: .json is read as JSON Lines
FOLDER_TABLE_SUFFIXES = {".jsonl", ".parquet"}
BINARY_SNIFF_BYTES = 8192
# Tokenizer training sees long documents in slices, so one huge file cannot take the whole budget.
TRAINING_SLICE_CHARS = 65536

_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class Documents:
    docs: list[str]
    content_hash: str
    decode_errors: int  # undecodable bytes (or lone surrogates in JSON) replaced by U+FFFD


class _BinaryFile(Exception):
    """A file that looks binary; a folder skips it, a single file given by name is an error."""


# ---------------------------------------------------------------- files


def _decode(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _BinaryFile(path)
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    # surrogateescape maps every undecodable byte to one lone surrogate: that counts bytes exactly.
    bad_bytes = len(_SURROGATES.findall(data.decode("utf-8", errors="surrogateescape")))
    return data.decode("utf-8", errors="replace"), bad_bytes


def _fix_surrogates(text: str) -> tuple[str, int]:
    # JSON can spell lone surrogates ("\ud800"); they cannot be encoded as UTF-8 nor tokenized.
    return _SURROGATES.subn("\ufffd", text)


def _text_value(value, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds a {type(value).__name__}, not text; "
                        "set text_field to a string field")
    return value


def _read_jsonl(path: Path, field: str) -> tuple[list[str], int]:
    text, errors = _decode(path)
    docs = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not a JSON object; {path.suffix} files need one JSON object "
                            f"per line with the text under {field!r}") from None
        if not isinstance(row, dict) or field not in row:
            has = ", ".join(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise DataError(f"{path}:{lineno}: no field {field!r} (has: {has or 'nothing'}); "
                            "set text_field in the source to the field holding the text")
        value = _text_value(row[field], f"{path}:{lineno}", field)
        if value is not None:
            value, fixed = _fix_surrogates(value)
            errors += fixed
            docs.append(value)
    return docs, errors


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (has: {', '.join(names)}); "
                            "set text_field in the source to the column holding the text")
        values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read parquet ({str(err).splitlines()[0][:200]}); check the file") from None
    return [v for v in (_text_value(v, str(path), field) for v in values) if v is not None]


def _read_file(path: Path, field: str, table_suffixes: set[str]) -> tuple[list[str], int]:
    suffix = path.suffix.lower()
    if suffix not in table_suffixes:
        text, errors = _decode(path)
        return [text], errors
    if suffix == ".parquet":
        return _read_parquet(path, field), 0
    return _read_jsonl(path, field)


def _folder_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_folder(root: Path, field: str, log: Callable) -> tuple[list[str], int]:
    docs, errors, binary = [], 0, []
    for path in _folder_files(root):
        try:
            file_docs, file_errors = _read_file(path, field, FOLDER_TABLE_SUFFIXES)
        except _BinaryFile:
            binary.append(path.relative_to(root).as_posix())
            continue
        docs += file_docs
        errors += file_errors
    if binary:
        shown = ", ".join(binary[:3]) + (f" and {len(binary) - 3} more" if len(binary) > 3 else "")
        log(f"warning: {root}: skipped {len(binary)} binary file(s): {shown}")
    return docs, errors


def _read_path(source: str, field: str, log: Callable) -> tuple[list[str], int]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder; fix the path in the recipe's data section "
                        "(or --set data.train=PATH)")
    if path.is_dir():
        return _read_folder(path, field, log)
    try:
        return _read_file(path, field, JSON_SUFFIXES | {".parquet"})
    except _BinaryFile:
        raise DataError(f"{source}: looks binary (NUL bytes in its first 8 KB), not text; give a UTF-8 text, "
                        "JSONL or parquet file") from None


# ---------------------------------------------------------------- HF datasets


def _load_hf(spec: SourceSpec, cache_dir: Path):
    # Must be set before `datasets` is first imported; the flag below covers an earlier import.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    where = Path(spec.source.removeprefix("hf:")).expanduser()
    if not where.is_dir():
        raise DataError(f"{spec.source}: {where} is not a folder; hf: sources are local dataset folders "
                        "(made by save_to_disk, or holding json/csv/parquet/txt data files)")
    saved_dataset = (where / "state.json").is_file() and (where / "dataset_info.json").is_file()
    saved_dict = (where / "dataset_dict.json").is_file()
    offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True  # never the network
    try:
        if saved_dataset or saved_dict:
            ds = datasets.load_from_disk(str(where))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise DataError(f"{spec.source}: no split {spec.split!r} (has: {', '.join(ds)}); "
                                    "set split in the source")
                ds = ds[spec.split]
            return ds
        return datasets.load_dataset(str(where), split=spec.split, cache_dir=str(Path(cache_dir) / "hf-datasets"))
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (ValueError for a split, FileNotFoundError, ...)
        raise DataError(f"{spec.source}: cannot load the dataset ({str(err).splitlines()[0][:200]})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _read_hf(spec: SourceSpec, cache_dir: Path) -> list[str]:
    ds = _load_hf(spec, cache_dir)
    if spec.text_field not in ds.column_names:
        raise DataError(f"{spec.source}: no column {spec.text_field!r} (has: {', '.join(ds.column_names)}); "
                        "set text_field in the source to the column holding the text")
    values = ds[spec.text_field]
    return [v for v in (_text_value(v, spec.source, spec.text_field) for v in values) if v is not None]


# ---------------------------------------------------------------- public


def read_documents(spec: SourceSpec, cache_dir: Path, log: Callable = print) -> Documents:
    """All documents of one source, in a deterministic order, with their content hash."""
    source = spec.source
    if source.startswith("builtin:"):
        from tunelab.data.builtin import builtin_documents  # lazy: only built-in sources need the stdlib scan

        docs, digest = builtin_documents(source.split(":", 1)[1], Path(cache_dir))
        return Documents(docs, digest, 0)
    if source.startswith("hf:"):
        docs, errors = _read_hf(spec, Path(cache_dir)), 0
    else:
        docs, errors = _read_path(source, spec.text_field, log)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{source}: no text (empty, whitespace only, or only binary files); "
                        "add text or remove the source from the recipe")
    if errors:
        log(f"warning: {source}: {errors} undecodable byte(s) were replaced by U+FFFD (the text is not all UTF-8)")
    return Documents(docs, content_hash(docs), errors)


def _slices(doc: str) -> Iterator[str]:
    for start in range(0, len(doc), TRAINING_SLICE_CHARS):
        yield doc[start:start + TRAINING_SLICE_CHARS]


def tokenizer_training_texts(specs: list[SourceSpec], cache_dir: Path, max_bytes: int) -> Iterator[str]:
    """Texts to train a tokenizer on: round-robin across sources, so each is represented, up to
    `max_bytes` UTF-8 bytes in total. Long documents come in 64K-character slices, so a source that
    is one big file alternates with the others instead of taking the whole budget. Deterministic."""
    streams = [(s for doc in read_documents(spec, cache_dir, log=lambda *a: None).docs for s in _slices(doc))
               for spec in specs]
    budget = max_bytes
    while streams and budget > 0:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
                continue
            data = text.encode("utf-8")
            if len(data) >= budget:
                yield data[:budget].decode("utf-8", errors="ignore")  # cut at a character boundary
                return
            budget -= len(data)
            yield text
