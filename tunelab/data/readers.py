"""Read the documents of one source as a stream: text files, folders, JSONL, parquet, HF datasets.

    notes.txt, README.md, ...  one document per file
    folder/                    every file under it, recursively, in sorted order, each one document;
                               hidden files and folders are skipped, binary files are skipped (and
                               listed in the tally), .jsonl and .parquet files inside are read as tables
                               (a .json file inside a folder is usually a config, so it counts as text)
    data.jsonl / data.json     JSON Lines: one object per line, the document under `text_field`
    data.parquet               the column `text_field`
    hf:<dir>                   a local HF dataset: a `save_to_disk` folder or a folder of data files

A document is a string, or, where a table's `text_field` holds a list of {"text": str, "loss": bool}
objects, a list of (text, loss) segments: text whose loss is false is context the model reads but is
not trained to predict (a prompt, say). "loss" defaults to true. A source with `format: chat` reads
tables only, one instruction example per row, each a `Chat` (data/chat.py: the forms it accepts), which
the token cache renders with the tokenizer's chat template; `format: preference` reads one
`PreferencePair` per row (a prompt, a chosen and a rejected reply) the same way.

Everything is read lazily (a folder file by file, JSONL line by line, parquet and HF datasets in
record batches), so memory does not grow with the source, only with its largest document. Every
file is opened through `_open`, the one place that touches file contents.

Bad input raises DataError with one line naming the source and the fix. Bytes that are not UTF-8
are replaced by U+FFFD and counted (a warning, not an error): one bad byte must not stop a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from tunelab.data.chat import CHAT_FIELDS, PREFERENCE_FIELDS, Chat, PreferencePair, chat_from_row, pair_from_row
from tunelab.errors import DataError

JSON_SUFFIXES = {".jsonl", ".json"}  # a single file given by name: .json is read as JSON Lines
FOLDER_TABLE_SUFFIXES = {".jsonl", ".parquet"}
BINARY_SNIFF_BYTES = 8192
TABLE_BATCH_ROWS = 1024  # rows per parquet / HF record batch: small, so memory stays bounded

Segment = tuple[str, bool]  # (text, loss)
Document = Union[str, list[Segment], Chat, PreferencePair]

_SURROGATES = re.compile("[\ud800-\udfff]")
# A segmented document's hash starts with 8 bytes no plain document's length prefix can have; a chat's too.
_SEGMENTED_MARK = b"\xff" * 8
_CHAT_MARK = b"\xfe" * 8
_PAIR_MARK = b"\xfd" * 8


def document_text(doc: Document) -> str:
    if isinstance(doc, (Chat, PreferencePair)):
        return doc.text()
    return doc if isinstance(doc, str) else "".join(text for text, _ in doc)


def has_text(doc: Document) -> bool:
    # isspace() instead of strip(): no copy of a big document just to look at it.
    if isinstance(doc, Chat):
        texts = [content for _, content in doc.messages]
    elif isinstance(doc, PreferencePair):
        return True  # pair_from_row refuses empty replies
    else:
        texts = [doc] if isinstance(doc, str) else [text for text, _ in doc]
    return any(text and not text.isspace() for text in texts)


@dataclass
class Tally:
    """What one pass over a source found; complete once the pass has ended."""

    documents: int = 0
    decode_errors: int = 0  # undecodable bytes (or lone surrogates in JSON) replaced by U+FFFD
    masked: bool = False  # some segment has loss false
    binary_files: list[str] = field(default_factory=list)  # skipped, relative to the folder
    _hash: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)

    def add(self, doc: Document) -> None:
        """Count a document into the content hash: sha256 over the documents in order, each length-
        prefixed so boundaries count (plain documents hash exactly as builtin.content_hash)."""
        self.documents += 1
        if isinstance(doc, str):
            self._add_text(doc)
            return
        if isinstance(doc, Chat):  # the example itself, not a rendering: the hash does not depend on a template
            self._hash.update(_CHAT_MARK + len(doc.messages).to_bytes(8, "little"))
            for role, content in doc.messages:
                self._add_text(role)
                self._add_text(content)
            self.masked = True  # only assistant turns are targets
            return
        if isinstance(doc, PreferencePair):
            self._hash.update(_PAIR_MARK + len(doc.prompt).to_bytes(8, "little"))
            for text in [t for message in doc.prompt for t in message] + [doc.chosen, doc.rejected]:
                self._add_text(text)
            self.masked = True  # only the replies are targets
            return
        self._hash.update(_SEGMENTED_MARK + len(doc).to_bytes(8, "little"))
        for text, loss in doc:
            self._hash.update(b"\x01" if loss else b"\x00")
            self._add_text(text)
            self.masked = self.masked or not loss

    def _add_text(self, text: str) -> None:
        data = text.encode("utf-8")
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    @property
    def content_hash(self) -> str:
        return self._hash.hexdigest()


def content_hash(docs) -> str:
    """The content hash of a list of documents (as a Tally computes it while streaming)."""
    tally = Tally()
    for doc in docs:
        tally.add(doc)
    return tally.content_hash


class _BinaryFile(Exception):
    """A file that looks binary; a folder skips it, a single file given by name is an error."""


# ---------------------------------------------------------------- values


def _open(path: Path):
    """Every read of a source file goes through here (tests check that a cached run never calls it)."""
    return open(path, "rb")


def _decode(data: bytes) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    # surrogateescape maps every undecodable byte to one lone surrogate: that counts bytes exactly.
    bad_bytes = len(_SURROGATES.findall(data.decode("utf-8", errors="surrogateescape")))
    return data.decode("utf-8", errors="replace"), bad_bytes


def _segments(value: list, where: str, name: str) -> list[Segment]:
    segments = []
    for i, segment in enumerate(value):
        text = segment.get("text") if isinstance(segment, dict) else None
        loss = segment.get("loss") if isinstance(segment, dict) else None
        loss = True if loss is None else loss  # left out (JSON) or null (a parquet struct without it)
        if not isinstance(text, str) or not isinstance(loss, bool):
            raise DataError(f"{where}: item {i} of field {name!r} is not a segment; a list there must hold objects "
                            '{"text": "...", "loss": true|false} ("loss" may be left out: true)')
        if text:  # an empty segment has no tokens: nothing to keep
            segments.append((text, loss))
    return segments


def _document(value, where: str, name: str, tally: Tally, json_text: bool) -> Document | None:
    """A table cell as a document (None: no document). JSON can spell lone surrogates ("\\ud800"),
    which cannot be encoded as UTF-8 nor tokenized: they become U+FFFD and count as decode errors."""
    if value is None:
        return None
    if isinstance(value, str):
        if json_text:
            value, fixed = _SURROGATES.subn("\ufffd", value)
            tally.decode_errors += fixed
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} holds a {type(value).__name__}, not text; "
                        "set text_field to a string field (or a list of {text, loss} segments)")
    segments = _segments(value, where, name)
    if json_text:
        for i, (text, loss) in enumerate(segments):
            text, fixed = _SURROGATES.subn("\ufffd", text)
            segments[i] = (text, loss)
            tally.decode_errors += fixed
    return segments or None


def _fix_surrogates(text: str, tally: Tally) -> str:
    text, fixed = _SURROGATES.subn("\ufffd", text)
    tally.decode_errors += fixed
    return text


def _row_document(row, table_format: str, where: str, tally: Tally, json_text: bool) -> Chat | PreferencePair:
    """One row of a chat or preference table (lone surrogates in JSON text replaced, as in _document)."""
    if table_format == "preference":
        pair = pair_from_row(row, where)
        if not json_text:
            return pair
        return PreferencePair(tuple((role, _fix_surrogates(content, tally)) for role, content in pair.prompt),
                              _fix_surrogates(pair.chosen, tally), _fix_surrogates(pair.rejected, tally))
    chat = chat_from_row(row, where)
    if not json_text:
        return chat
    return Chat(tuple((role, _fix_surrogates(content, tally)) for role, content in chat.messages))


# ---------------------------------------------------------------- files


def _read_text(path: Path, tally: Tally) -> str:
    with _open(path) as f:
        data = f.read()
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _BinaryFile(path)
    text, bad = _decode(data)
    tally.decode_errors += bad
    return text


def _iter_jsonl(path: Path, name: str, tally: Tally, table_format: str = "text") -> Iterator[Document]:
    with _open(path) as f:
        if b"\0" in f.read(BINARY_SNIFF_BYTES):
            raise _BinaryFile(path)
        f.seek(0)
        # A binary file iterates on b"\n" only: JSON strings may hold U+2028 and friends unescaped, and
        # no byte of a multi-byte UTF-8 character is \n, so decoding line by line counts bad bytes exactly.
        for lineno, raw in enumerate(f, 1):
            line, bad = _decode(raw)
            tally.decode_errors += bad
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                what = f"a {table_format} example" if table_format != "text" else f"the text under {name!r}"
                raise DataError(f"{path}:{lineno}: not a JSON object ({err.msg}, column {err.colno}); {path.suffix} "
                                f"files need one JSON object per line with {what}") from None
            if table_format != "text":
                yield _row_document(row, table_format, f"{path}:{lineno}", tally, json_text=True)
                continue
            if not isinstance(row, dict) or name not in row:
                has = ", ".join(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
                raise DataError(f"{path}:{lineno}: no field {name!r} (has: {has or 'nothing'}); "
                                + _text_field_fix(row if isinstance(row, dict) else [], str(path), "field"))
            doc = _document(row[name], f"{path}:{lineno}", name, tally, json_text=True)
            if doc is not None:
                yield doc


def _text_field_fix(names, source: str, kind: str) -> str:
    """The fix for a text source without its text field. Rows that look like chat examples or preference
    pairs get the format to set: said, not guessed, so the recipe (and config.yaml) still says what a
    run trained on, and the same recipe never trains differently because a file changed."""
    names = set(names)
    if {"chosen", "rejected"} <= names:
        fmt = "preference"
    elif "messages" in names or any(pair <= names for pair in ({"prompt", "response"}, {"prompt", "completion"},
                                                                   {"instruction", "output"})):
        fmt = "chat"
    else:
        return f"set text_field in the source to the {kind} holding the text"
    return (f"these rows are {fmt} examples: set format: {fmt} in the source, e.g. "
            f"--set 'data.train=[{{source: {source}, format: {fmt}}}]'")


def _parquet_error(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: cannot read parquet ({str(err).splitlines()[0][:200]}); check the file")


def _table_columns(names: list[str], table_format: str, where) -> list[str]:
    fields = PREFERENCE_FIELDS if table_format == "preference" else CHAT_FIELDS
    columns = [c for c in fields if c in names]
    if not columns:
        needs = ("'prompt' (or 'messages'), 'chosen' and 'rejected'" if table_format == "preference" else
                 "'messages', 'prompt' + 'response', or 'instruction' + 'output'")
        raise DataError(f"{where}: no {table_format} columns (has: {', '.join(names)}); a {table_format} source "
                        f"needs {needs}")
    return columns


def _iter_parquet(path: Path, name: str, tally: Tally, table_format: str = "text") -> Iterator[Document]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        try:  # pyarrow raises several types for a damaged file
            table = pq.ParquetFile(f)
            names = table.schema_arrow.names
        except Exception as err:
            raise _parquet_error(path, err) from None
        if table_format == "text" and name not in names:
            raise DataError(f"{path}: no column {name!r} (has: {', '.join(names)}); "
                            + _text_field_fix(names, str(path), "column"))
        columns = _table_columns(names, table_format, path) if table_format != "text" else [name]
        batches = table.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=columns)
        row_number = 0
        while True:
            try:
                batch = next(batches, None)
            except Exception as err:
                raise _parquet_error(path, err) from None
            if batch is None:
                return
            if table_format != "text":
                for row in batch.to_pylist():
                    yield _row_document(row, table_format, f"{path}: row {row_number}", tally, json_text=False)
                    row_number += 1
                continue
            for value in batch.column(0).to_pylist():
                doc = _document(value, str(path), name, tally, json_text=False)
                if doc is not None:
                    yield doc


def _iter_file(path: Path, name: str, table_suffixes: set[str], tally: Tally, table_format: str = "text"
               ) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix not in table_suffixes:
        if table_format != "text":
            raise DataError(f"{path}: a {table_format} source reads tables (.jsonl, .json, .parquet), not text files; "
                            "move the file out of the source or set format: text")
        yield _read_text(path, tally)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, name, tally, table_format)
    else:
        yield from _iter_jsonl(path, name, tally, table_format)


def folder_files(root: Path) -> list[Path]:
    """The files a folder source reads, in the order it reads them."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _iter_folder(root: Path, name: str, tally: Tally, table_format: str = "text") -> Iterator[Document]:
    for path in folder_files(root):
        try:
            yield from _iter_file(path, name, FOLDER_TABLE_SUFFIXES, tally, table_format)
        except _BinaryFile:  # raised before the file yields anything: nothing half-read
            tally.binary_files.append(path.relative_to(root).as_posix())


def source_path(source: str) -> Path:
    return Path(source.removeprefix("hf:")).expanduser()


def iter_path(source: str, name: str, tally: Tally, table_format: str = "text") -> Iterator[Document]:
    path = source_path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder; fix the path in the recipe's data section "
                        "(or --set data.train=PATH)")
    if path.is_dir():
        yield from _iter_folder(path, name, tally, table_format)
        return
    try:
        yield from _iter_file(path, name, JSON_SUFFIXES | {".parquet"}, tally, table_format)
    except _BinaryFile:
        raise DataError(f"{source}: looks binary (NUL bytes in its first 8 KB), not text; give a UTF-8 text, "
                        "JSONL or parquet file") from None


# ---------------------------------------------------------------- HF datasets


def _load_hf(spec, cache_dir: Path):
    # Must be set before `datasets` is first imported; the flag below covers an earlier import.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    where = source_path(spec.source)
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


def iter_hf(spec, cache_dir: Path, tally: Tally) -> Iterator[Document]:
    ds = _load_hf(spec, cache_dir)
    name = spec.text_field
    table_format = getattr(spec, "format", "text")
    if table_format != "text":
        columns = _table_columns(ds.column_names, table_format, spec.source)
        for index, row in enumerate(ds.select_columns(columns)):  # rows from the memory-mapped Arrow files
            yield _row_document(row, table_format, f"{spec.source}: row {index}", tally, json_text=False)
        return
    if name not in ds.column_names:
        raise DataError(f"{spec.source}: no column {name!r} (has: {', '.join(ds.column_names)}); "
                        + _text_field_fix(ds.column_names, spec.source, "column"))
    # Record batches from the memory-mapped Arrow files: the dataset is never loaded whole.
    for batch in ds.select_columns([name]).iter(batch_size=TABLE_BATCH_ROWS):
        for value in batch[name]:
            doc = _document(value, spec.source, name, tally, json_text=False)
            if doc is not None:
                yield doc
