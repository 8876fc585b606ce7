"""Tokenize a source once, in parallel, and keep the tokens on disk as memory-mapped arrays.

Held-out split (deterministic, per source):
- 20 or more documents: a document is held out when the first 8 bytes of sha256(text), read as
  a fraction of 2**64, fall under `eval_fraction`. The decision depends only on the document,
  so adding or removing other documents never moves text between train and eval. At least one
  document lands on each side.
- fewer documents (e.g. one big text file): the last `eval_fraction` of each document's
  characters, cut at a line boundary (at least one line), is held out.

Cache: <cache_dir>/tokens/<key>/{train.bin, eval.bin, meta.json}, key = sha256 of the source's
content hash, the tokenizer, the EOS id and the split fraction. Written to a temporary folder and
renamed, so concurrent writers (DDP ranks) and crashes never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tunelab.config import SourceSpec
from tunelab.data.sources import read_documents

FORMAT_VERSION = 1
MIN_DOCS_FOR_HASH_SPLIT = 20
CHUNK_CHARS = 8_000_000  # text per batch handed to the Rust encoder


@dataclass
class TokenizedSource:
    spec: SourceSpec
    domain: str
    train: np.ndarray
    eval: np.ndarray
    train_bytes: int
    eval_bytes: int
    train_docs: int
    eval_docs: int
    content_hash: str
    cache_key: str
    decode_errors: int


def _doc_fraction(doc: str) -> float:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8", errors="surrogatepass")).digest()[:8], "big") / 2**64


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    if len(docs) >= MIN_DOCS_FOR_HASH_SPLIT:
        scores = [_doc_fraction(d) for d in docs]
        held = [s < eval_fraction for s in scores]
        if not any(held):
            held[int(np.argmin(scores))] = True
        if all(held):
            held[int(np.argmax(scores))] = False
        return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]
    train, held_out = [], []
    for doc in docs:
        cut = int(len(doc) * (1 - eval_fraction))
        line_start = doc.rfind("\n", 0, cut) + 1  # start of the line holding the cut
        if line_start > 0 and doc[line_start:].strip():
            cut = line_start
        head, tail = doc[:cut], doc[cut:]
        if head.strip():
            train.append(head)
        if tail.strip():
            held_out.append(tail)
    return train, held_out


def tokenizer_fingerprint(tokenizer) -> str:
    from tunelab.models import tokenizer_fingerprint as fp

    return fp(tokenizer)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if getattr(tokenizer, "is_fast", False):
        # The Rust batch encoder spreads a batch over all cores.
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _write_tokens(path: Path, docs: list[str], tokenizer, eos_id: int, dtype) -> int:
    n = 0
    with open(path, "wb") as f:
        batch, size = [], 0
        for i, doc in enumerate(docs + [None]):
            if doc is not None:
                batch.append(doc)
                size += len(doc)
            if batch and (doc is None or size >= CHUNK_CHARS):
                for ids in _encode(tokenizer, batch):
                    arr = np.asarray(ids + [eos_id], dtype=dtype)
                    f.write(arr.tobytes())
                    n += len(arr)
                batch, size = [], 0
    return n


def _load(where: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((where / "meta.json").read_text())
    arrays = []
    for split in ("train", "eval"):
        if meta[f"{split}_tokens"] == 0:
            arrays.append(np.zeros(0, dtype=meta["dtype"]))
        else:
            arrays.append(np.memmap(where / f"{split}.bin", dtype=meta["dtype"], mode="r",
                                    shape=(meta[f"{split}_tokens"],)))
    return arrays[0], arrays[1], meta


def tokenize_source(spec: SourceSpec, tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                    log: Callable = print) -> TokenizedSource:
    start = time.perf_counter()
    documents = read_documents(spec, cache_dir, log=log)
    key = hashlib.sha256(repr((FORMAT_VERSION, documents.content_hash, tokenizer_fingerprint(tokenizer), eos_id,
                               eval_fraction)).encode()).hexdigest()[:32]
    where = Path(cache_dir) / "tokens" / key
    cached = (where / "meta.json").is_file()
    if not cached:
        train_docs, eval_docs = split_documents(documents.docs, eval_fraction)
        dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
        tmp = where.with_name(f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"domain": spec.domain, "source": spec.source, "dtype": np.dtype(dtype).name,
                "content_hash": documents.content_hash, "decode_errors": documents.decode_errors,
                "train_docs": len(train_docs), "eval_docs": len(eval_docs),
                "train_bytes": sum(len(d.encode("utf-8", errors="replace")) for d in train_docs),
                "eval_bytes": sum(len(d.encode("utf-8", errors="replace")) for d in eval_docs)}
        meta["train_tokens"] = _write_tokens(tmp / "train.bin", train_docs, tokenizer, eos_id, dtype)
        meta["eval_tokens"] = _write_tokens(tmp / "eval.bin", eval_docs, tokenizer, eos_id, dtype)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(where)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    train, held_out, meta = _load(where)
    log(f"data {spec.domain}: {meta['train_docs']}+{meta['eval_docs']} docs, {len(train):,}+{len(held_out):,} "
        f"tokens (train+eval), {(meta['train_bytes'] + meta['eval_bytes']) / 1e6:.1f} MB, "
        f"{'cached' if cached else 'tokenized'} in {time.perf_counter() - start:.1f}s")
    return TokenizedSource(spec=spec, domain=spec.domain, train=train, eval=held_out,
                           train_bytes=meta["train_bytes"], eval_bytes=meta["eval_bytes"],
                           train_docs=meta["train_docs"], eval_docs=meta["eval_docs"],
                           content_hash=documents.content_hash, cache_key=key,
                           decode_errors=documents.decode_errors)


def tokenize_sources(specs: list[SourceSpec], tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                     log: Callable = print) -> list[TokenizedSource]:
    return [tokenize_source(s, tokenizer, eos_id, cache_dir, eval_fraction, log) for s in specs]
