"""Tokenize a source once, on all cores, and keep its tokens on disk as memory-mapped arrays.

Held-out split, deterministic and per source:
- 20 or more documents: a document is held out when the first 8 bytes of sha256(text), read as a
  fraction of 2**64, fall below `eval_fraction`. The decision depends on the document alone, so
  adding or removing other documents never moves text between train and eval. At least one
  document lands on each side: if the rule holds out none, the document with the smallest hash
  is held out; if it holds out all, the one with the largest hash is kept for training.
- fewer documents (e.g. one big text file): each document is cut in two. Its last `eval_fraction`
  of characters (trailing whitespace aside) goes to eval, moved back to the start of the line the
  cut falls in, so eval holds whole lines, at least one. If that would leave no training text
  (the cut is in the first line), the cut moves to the start of the next line instead; a document
  of one line is cut at the character. Train and eval text together are exactly the document.

Token arrays hold every document's tokens followed by one EOS. Cache layout:
    <cache_dir>/tokens/<key>/{train.bin, eval.bin, meta.json}
with key = sha256(format version, content hash, tokenizer fingerprint, eos id, eval fraction). An
entry is written into a temporary folder and renamed into place, so a crash never leaves a half
entry and of two processes (DDP ranks) writing the same entry the loser just uses the winner's.
Leftover `.tmp-*` folders from crashed writers are harmless and can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from tunelab.config import SourceSpec
from tunelab.data.sources import read_documents

FORMAT_VERSION = 1
MIN_DOCS_FOR_HASH_SPLIT = 20
# A batch handed to the Rust encoder, which spreads it over all cores: big enough to keep them
# busy, small enough that the Encoding objects (ids, offsets, masks) stay a bounded amount of memory.
BATCH_DOCS = 256
BATCH_CHARS = 8_000_000
# Longer documents are encoded in pieces cut at line ends: one huge file then uses all cores, and the
# encoder is faster on short strings anyway (measured: a 5 MB file in 1 MB pieces takes 3x as long as in
# 32K pieces). A cut is only taken where it does not change the tokens (see _safe_cut).
PIECE_CHARS = 32_000
# Candidate cuts: a newline with text right before and after it. Byte-level BPE pre-tokenizers glue
# a newline to neighbouring whitespace (indentation, blank lines), where a cut would change the tokens.
_LINE_BEFORE_TEXT = re.compile(r"(?<=\S)\n(?=\S)")


@dataclass
class TokenizedSource:
    spec: SourceSpec
    domain: str
    train: np.ndarray  # np.memmap (a plain empty array when a split has no tokens)
    eval: np.ndarray
    train_bytes: int
    eval_bytes: int
    train_docs: int
    eval_docs: int
    content_hash: str
    cache_key: str
    decode_errors: int


# ---------------------------------------------------------------- held-out split


def _hash_fraction(doc: str) -> float:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64


def _split_by_hash(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    scores = [_hash_fraction(d) for d in docs]
    held = [s < eval_fraction for s in scores]
    if not any(held):
        held[scores.index(min(scores))] = True
    if all(held):
        held[scores.index(max(scores))] = False
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def _cut_point(doc: str, eval_fraction: float) -> int:
    end = len(doc.rstrip())  # trailing whitespace rides along with the eval tail
    cut = int(end * (1 - eval_fraction))
    line_start = doc.rfind("\n", 0, cut) + 1
    if line_start > 0:
        return line_start
    next_line = doc.find("\n", cut, end) + 1
    if next_line > 0:
        return next_line
    return max(1, cut) if end > 1 else end  # one line: cut by characters, keeping some of each side


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval) texts of one source by the rule in the module docstring."""
    if len(docs) >= MIN_DOCS_FOR_HASH_SPLIT:
        return _split_by_hash(docs, eval_fraction)
    train, held_out = [], []
    for doc in docs:
        cut = _cut_point(doc, eval_fraction)
        if doc[:cut]:
            train.append(doc[:cut])
        if doc[cut:]:
            held_out.append(doc[cut:])
    return train, held_out


# ---------------------------------------------------------------- encoding


def _raw_backend(tokenizer):
    """The Rust tokenizer with truncation and padding off (copied if the caller left them on)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenizer_fingerprint(tokenizer) -> str:
    if getattr(tokenizer, "is_fast", False):
        blob = _raw_backend(tokenizer).to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    if getattr(tokenizer, "is_fast", False):
        backend = _raw_backend(tokenizer)
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _safe_cut(doc: str, start: int, encode) -> int | None:
    """A line end at or after `start` where encoding the two sides apart gives the same tokens as
    encoding them together (checked on a window around it), or None if the next few candidates fail."""
    for match, _ in zip(_LINE_BEFORE_TEXT.finditer(doc, start), range(20)):
        cut = match.end()
        left, right = doc[max(0, cut - 200):cut], doc[cut:cut + 200]
        together, left_ids, right_ids = encode([left + right, left, right])
        if together == left_ids + right_ids:
            return cut
    return None


def _pieces(doc: str, encode) -> Iterator[str]:
    start = 0
    while len(doc) - start > PIECE_CHARS:
        cut = _safe_cut(doc, start + PIECE_CHARS, encode)
        if cut is None:
            break
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def _batches(docs: Iterable[str], encode) -> Iterator[list[tuple[str, bool]]]:
    """(piece, is the document's last piece) in batches for the encoder."""
    batch, chars = [], 0
    for doc in docs:
        pieces = list(_pieces(doc, encode))
        for i, piece in enumerate(pieces):
            batch.append((piece, i == len(pieces) - 1))
            chars += len(piece)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _write_tokens(path: Path, docs: list[str], encode, eos_id: int, dtype) -> int:
    """Stream the documents' tokens, an EOS after each, into `path`; returns the token count."""
    count = 0
    with open(path, "wb") as f:
        for batch in _batches(docs, encode):
            flat: list[int] = []
            for ids, (_, last) in zip(encode([piece for piece, _ in batch]), batch):
                flat.extend(ids)
                if last:
                    flat.append(eos_id)
            f.write(np.asarray(flat, dtype=dtype).tobytes())
            count += len(flat)
    return count


# ---------------------------------------------------------------- cache


def cache_key(content_hash: str, tokenizer, eos_id: int, eval_fraction: float) -> str:
    parts = [FORMAT_VERSION, content_hash, tokenizer_fingerprint(tokenizer), int(eos_id), float(eval_fraction)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _token_dtype(tokenizer, eos_id: int):
    return np.uint16 if max(len(tokenizer), eos_id + 1) < 2**16 else np.uint32


def _open_tokens(path: Path, dtype: str, n: int) -> np.ndarray:
    if path.stat().st_size != n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: size does not match meta.json")
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _load_entry(where: Path) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The entry's arrays and meta, or None if it is missing or damaged (never half-loaded)."""
    try:
        meta = json.loads((where / "meta.json").read_text())
        train = _open_tokens(where / "train.bin", meta["dtype"], meta["train_tokens"])
        held_out = _open_tokens(where / "eval.bin", meta["dtype"], meta["eval_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return train, held_out, meta


def _tokenize_into(folder: Path, documents, domain: str, tokenizer, eos_id: int, eval_fraction: float) -> None:
    train_docs, eval_docs = split_documents(documents.docs, eval_fraction)
    dtype = _token_dtype(tokenizer, eos_id)
    encode = _encoder(tokenizer)
    meta = {"format_version": FORMAT_VERSION, "domain": domain, "dtype": np.dtype(dtype).name,
            "content_hash": documents.content_hash, "decode_errors": documents.decode_errors,
            "eos_id": int(eos_id), "eval_fraction": float(eval_fraction),
            "train_docs": len(train_docs), "eval_docs": len(eval_docs),
            "train_bytes": sum(len(d.encode("utf-8")) for d in train_docs),
            "eval_bytes": sum(len(d.encode("utf-8")) for d in eval_docs),
            "train_tokens": _write_tokens(folder / "train.bin", train_docs, encode, eos_id, dtype),
            "eval_tokens": _write_tokens(folder / "eval.bin", eval_docs, encode, eos_id, dtype)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _discard(where: Path) -> None:
    """Move a damaged entry out of the way (rename first: another process may be doing the same)."""
    trash = where.with_name(f".broken-{where.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(where, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write_entry(where: Path, documents, domain: str, tokenizer, eos_id: int, eval_fraction: float) -> None:
    if where.exists() and _load_entry(where) is None:
        _discard(where)
    tmp = where.with_name(f".tmp-{where.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _tokenize_into(tmp, documents, domain, tokenizer, eos_id, eval_fraction)
        try:
            os.rename(tmp, where)
        except OSError:
            if _load_entry(where) is None:  # not another writer that won the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


# ---------------------------------------------------------------- public


def tokenize_source(spec: SourceSpec, tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                    log: Callable = print) -> TokenizedSource:
    """The source's train/eval tokens, from the cache or tokenized now (and cached)."""
    start = time.perf_counter()
    documents = read_documents(spec, cache_dir, log=log)
    key = cache_key(documents.content_hash, tokenizer, eos_id, eval_fraction)
    where = Path(cache_dir) / "tokens" / key
    entry = _load_entry(where)
    cached = entry is not None
    if entry is None:
        _write_entry(where, documents, spec.domain, tokenizer, eos_id, eval_fraction)
        entry = _load_entry(where)
        if entry is None:
            raise RuntimeError(f"{where}: token cache entry unreadable right after writing it")
    train, held_out, meta = entry
    megabytes = (meta["train_bytes"] + meta["eval_bytes"]) / 1e6
    log(f"data {spec.domain}: {meta['train_docs']:,} train + {meta['eval_docs']:,} eval docs, "
        f"{len(train):,} + {len(held_out):,} tokens, {megabytes:.1f} MB, {time.perf_counter() - start:.1f}s "
        f"({'cached' if cached else 'tokenized'})")
    return TokenizedSource(spec=spec, domain=spec.domain, train=train, eval=held_out,
                           train_bytes=meta["train_bytes"], eval_bytes=meta["eval_bytes"],
                           train_docs=meta["train_docs"], eval_docs=meta["eval_docs"],
                           content_hash=documents.content_hash, cache_key=key,
                           decode_errors=documents.decode_errors)


def tokenize_sources(specs: list[SourceSpec], tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                     log: Callable = print) -> list[TokenizedSource]:
    return [tokenize_source(spec, tokenizer, eos_id, cache_dir, eval_fraction, log=log) for spec in specs]
