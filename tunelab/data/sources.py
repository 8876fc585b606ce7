"""Sources: their documents as a stream, their content hash (looked up without reading when the files
did not change), and texts for tokenizer training.

    builtin:prose|code|tests   the stdlib corpus (tunelab.data.builtin), which keeps its own cache
    builtin:instruct           chat examples generated from the stdlib (tunelab.data.instruct) into a
                               JSONL file in the cache, then read as that file (format: chat)
    builtin:preference         preference pairs generated the same way (format: preference)
    files, folders, hf:<dir>   read by tunelab.data.readers (formats and errors described there)
    a dataset directory        a dataset artifact (tunelab.data.artifact): read as its data file, in the
                               format its manifest names

The content hash is sha256 over the source's non-blank documents in order (readers.Tally.add).
Computing it means reading everything, so for files, folders and hf: folders it is kept in a small
stat index, one JSON file per source:
    <cache_dir>/sources/<sha256(kind, resolved path, text_field, split)>.json
It holds the hash together with a digest of the source's listing: the reader version, text_field,
split, and (relative path, size, mtime_ns) of every file the reader would open (for hf:, every file
under the folder). While the listing is unchanged the hash comes from the index and no file is
opened; an edit, a new or a removed file changes the listing and the source is read (once) again.
A file modified less than RACY_SECONDS before the listing was taken could be modified again within
the same timestamp tick without its stat changing, so such a listing is not indexed (the next run
reads again, and indexes it once the files are older).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tunelab.config import SourceSpec
from tunelab.data.artifact import dataset_source
from tunelab.data.readers import (Document, Tally, content_hash, document_text, folder_files, has_text,
                                  iter_hf, iter_path, source_path)
from tunelab.errors import DataError

__all__ = ["Documents", "SourceIdentity", "content_hash", "forget_source_index", "iter_documents", "log_read_warnings",
           "read_documents", "source_content_hash", "source_identity", "tokenizer_training_texts"]

# Bump when the readers give different documents for the same files, so indexed hashes are not reused.
READER_VERSION = 2
RACY_SECONDS = 2
# Tokenizer training sees long documents in slices, so one huge file cannot take the whole budget.
TRAINING_SLICE_CHARS = 65536


@dataclass
class Documents:
    docs: list[Document]
    content_hash: str
    decode_errors: int


@dataclass(frozen=True)
class SourceIdentity:
    content_hash: str
    masked: bool  # some segment has loss false: the token cache keeps a loss mask for this source


def _quiet(*args) -> None:
    pass


def _generated(spec: SourceSpec, cache_dir: Path) -> SourceSpec:
    """A built-in source that is generated into a file (builtin:instruct, builtin:preference), or a dataset artifact,
    as a spec of that file; others as they are. The stat index then works as for any file."""
    name = {"builtin:instruct": "instruct", "builtin:preference": "preference"}.get(spec.source)
    if name is None:
        return dataset_source(spec)
    from tunelab.data.instruct import builtin_instruct_file  # lazy: only this source scans the stdlib

    return spec.model_copy(update={"source": str(builtin_instruct_file(name, Path(cache_dir))),
                                   "name": spec.domain, "format": "chat" if name == "instruct" else "preference"})


# ---------------------------------------------------------------- documents


def log_read_warnings(source: str, decode_errors: int, binary_files: list[str], log: Callable,
                      binary_count: int | None = None) -> None:
    """The warnings of a read; `binary_files` may be the first few of `binary_count` skipped files."""
    count = len(binary_files) if binary_count is None else binary_count
    if count:
        shown = ", ".join(binary_files[:3]) + (f" and {count - 3} more" if count > 3 else "")
        log(f"warning: {source}: skipped {count} binary file(s): {shown}")
    if decode_errors:
        log(f"warning: {source}: {decode_errors} undecodable byte(s) were replaced by U+FFFD "
            "(the text is not all UTF-8)")


def iter_documents(spec: SourceSpec, cache_dir: Path, log: Callable = print, tally: Tally | None = None
                   ) -> Iterator[Document]:
    """The source's non-blank documents in order, read as they are consumed. `tally` (optional) gets the
    content hash, decode errors and skipped files; it is complete when the iteration has ended, which
    is also when warnings are logged and an empty source raises DataError."""
    tally = Tally() if tally is None else tally
    spec = _generated(spec, cache_dir)
    source = spec.source
    if source.startswith("builtin:"):
        from tunelab.data.builtin import builtin_documents  # lazy: only built-in sources need the stdlib scan

        docs = iter(builtin_documents(source.split(":", 1)[1], Path(cache_dir))[0])
    elif source.startswith("hf:"):
        docs = iter_hf(spec, Path(cache_dir), tally)
    else:
        docs = iter_path(source, spec.text_field, tally, table_format=spec.format)
    for doc in docs:
        if has_text(doc):
            tally.add(doc)
            yield doc
    log_read_warnings(source, 0, tally.binary_files, log)
    if not tally.documents:
        raise DataError(f"{source}: no text (empty, whitespace only, or only binary files); "
                        "add text or remove the source from the recipe")
    log_read_warnings(source, tally.decode_errors, [], log)


def read_documents(spec: SourceSpec, cache_dir: Path, log: Callable = print) -> Documents:
    """All documents of one source in a list (small sources and tests; the pipeline streams)."""
    spec = _generated(spec, cache_dir)
    if spec.source.startswith("builtin:"):
        from tunelab.data.builtin import builtin_documents

        docs, digest = builtin_documents(spec.source.split(":", 1)[1], Path(cache_dir))
        return Documents(docs, digest, 0)
    tally = Tally()
    docs = list(iter_documents(spec, cache_dir, log=log, tally=tally))
    return Documents(docs, tally.content_hash, tally.decode_errors)


# ---------------------------------------------------------------- content hash and the stat index


@dataclass
class _Listing:
    digest: str
    files: int
    racy: bool


def _listing(spec: SourceSpec) -> _Listing | None:
    """The digest of what the reader would open, by stat only; None if it cannot be listed (the reader
    then reports the problem in its own words)."""
    path = source_path(spec.source)
    taken = time.time_ns()
    try:
        files = folder_files(path) if path.is_dir() else [path]
        rows = []
        for file in files:
            stat = file.stat()
            name = file.name if file == path else file.relative_to(path).as_posix()
            rows.append((name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    split = spec.split if spec.source.startswith("hf:") else None
    chat = [spec.format] if spec.format != "text" else []  # the same files read as chat examples: another content
    blob = json.dumps([READER_VERSION, spec.text_field, split, rows] + chat)
    racy = any(mtime >= taken - RACY_SECONDS * 10**9 for _, _, mtime in rows)
    return _Listing(hashlib.sha256(blob.encode()).hexdigest(), len(rows), racy)


def _index_path(spec: SourceSpec, cache_dir: Path) -> Path:
    kind = "hf" if spec.source.startswith("hf:") else "path"
    split = spec.split if kind == "hf" else None
    chat = [spec.format] if spec.format != "text" else []
    name = json.dumps([kind, str(source_path(spec.source).resolve()), spec.text_field, split] + chat)
    return Path(cache_dir) / "sources" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def _read_index(path: Path, listing: _Listing) -> SourceIdentity | None:
    try:
        entry = json.loads(path.read_text())
        if entry["listing"] == listing.digest:
            return SourceIdentity(str(entry["content_hash"]), bool(entry["masked"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: read the source
    return None


def _write_index(path: Path, entry: dict) -> None:
    # Several processes (DDP ranks) may write at once: each writes its own temp file, the rename is atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable by all its users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def source_identity(spec: SourceSpec, cache_dir: Path, log: Callable = print) -> SourceIdentity:
    """Content hash (and whether loss masks are needed) of a source: from the stat index when its files
    are unchanged, else by reading it once (and indexing the result). The read's warnings (skipped
    files, undecodable bytes) are not logged here but once, where the source is tokenized
    (tokcache.tokenize_source logs them from its cache entry); `log` is kept for the callers."""
    spec = _generated(spec, cache_dir)
    if spec.source.startswith("builtin:"):
        from tunelab.data.builtin import builtin_documents

        return SourceIdentity(builtin_documents(spec.source.split(":", 1)[1], Path(cache_dir))[1], False)
    listing = _listing(spec)
    index = _index_path(spec, cache_dir)
    if listing is not None:
        found = _read_index(index, listing)
        if found is not None:
            return found
    tally = Tally()
    for _ in iter_documents(spec, cache_dir, log=_quiet, tally=tally):
        pass
    identity = SourceIdentity(tally.content_hash, tally.masked)
    if listing is not None and not listing.racy:
        _write_index(index, {"source": spec.source, "listing": listing.digest, "files": listing.files,
                             "content_hash": identity.content_hash, "masked": identity.masked,
                             "documents": tally.documents})
    return identity


def forget_source_index(spec: SourceSpec, cache_dir: Path) -> None:
    """Drop the source's index entry: the next source_identity reads the source again."""
    if spec.source.startswith("builtin:"):
        spec = _generated(spec, cache_dir)
    _index_path(spec, cache_dir).unlink(missing_ok=True)


def source_content_hash(spec: SourceSpec, cache_dir: Path, log: Callable = print) -> str:
    """The source's content hash; reads nothing when the stat index says the files are unchanged."""
    return source_identity(spec, cache_dir, log=log).content_hash


# ---------------------------------------------------------------- tokenizer training


def _training_slices(spec: SourceSpec, cache_dir: Path) -> Iterator[str]:
    for doc in iter_documents(spec, cache_dir, log=_quiet):
        text = document_text(doc)  # the tokenizer sees every segment, masked or not
        for start in range(0, len(text), TRAINING_SLICE_CHARS):
            yield text[start:start + TRAINING_SLICE_CHARS]


def tokenizer_training_texts(specs: list[SourceSpec], cache_dir: Path, max_bytes: int) -> Iterator[str]:
    """Texts to train a tokenizer on: round-robin across sources, so each is represented, up to
    `max_bytes` UTF-8 bytes in total. Long documents come in 64K-character slices, so a source that
    is one big file alternates with the others instead of taking the whole budget. Deterministic.
    Sources are read lazily: only as much as the budget takes."""
    streams = [_training_slices(spec, cache_dir) for spec in specs]
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
