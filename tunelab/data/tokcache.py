"""Tokenize a source once, streaming, and keep its tokens on disk as memory-mapped arrays.

A source is read document by document (tunelab.data.sources), split into train and held-out pieces
by the rule in tunelab.data.split, encoded in batches on all cores and written as it goes
(tunelab.data.encode): memory stays bounded by a batch plus the largest document. With
split=False (an eval-only source scored whole) every document goes to eval and train is empty.

Cache layout:
    <cache_dir>/tokens/<key>/{train.bin, eval.bin, meta.json}
    (+ train.mask.bin, eval.mask.bin: uint8 loss masks, only for a source with masked segments)
    (+ train.starts.bin, eval.starts.bin: int64 document starts, only for a chat or preference source)
with key = sha256(format version, content hash, tokenizer fingerprint, eos id, the tokenizer's own
prefix/suffix ids, eval fraction or "unsplit"; for a chat source also the chat template and which
assistant turns are targets). A chat source's examples are rendered here, with the tokenizer's template
(data/chat.py), after the held-out split has been decided on the examples themselves; a preference pair
becomes two documents in a row (prompt + chosen, prompt + rejected), on the same side of the split. The content
hash comes from the source's stat index (tunelab.data.sources), so a cached source whose files did
not change is not even opened. An entry
is written into a temporary folder and renamed into place, so a crash never leaves a half entry and
of two processes (DDP ranks) writing the same entry the loser just uses the winner's. Leftover
`.tmp-*` folders from crashed writers are harmless and can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tunelab.config import SourceSpec
from tunelab.data.chat import Chat, ChatRenderer, PreferencePair
from tunelab.data.encode import SplitFile, token_dtype, write_pieces
from tunelab.data.readers import Tally
from tunelab.data.sources import (SourceIdentity, forget_source_index, iter_documents, log_read_warnings,
                                  source_identity)
from tunelab.data.split import HeldOut, split_documents, split_pieces, whole_pieces
from tunelab.errors import DataError
from tunelab.tokenizers import BUILTIN_TEMPLATE, closing_tokens, encoder, special_tokens, tokenizer_fingerprint

__all__ = ["FORMAT_VERSION", "TokenizedSource", "cache_key", "split_documents", "tokenize_source",
           "tokenize_sources"]

# 2: one held-out rule (units), the tokenizer's own special tokens around each piece, loss masks.
FORMAT_VERSION = 2


@dataclass
class TokenizedSource:
    spec: SourceSpec
    domain: str
    train: np.ndarray  # np.memmap (a plain empty array when a split has no tokens)
    eval: np.ndarray
    train_bytes: int
    eval_bytes: int
    train_docs: int  # pieces (tunelab.data.split), each packed as one document
    eval_docs: int
    content_hash: str
    cache_key: str
    decode_errors: int
    train_mask: np.ndarray | None = None  # uint8, aligned with train (1 = a training target); None: all 1
    eval_mask: np.ndarray | None = None
    train_starts: np.ndarray | None = None  # int64 token offset of every document (chat sources only)
    eval_starts: np.ndarray | None = None


def _quiet(*args) -> None:
    pass


# ---------------------------------------------------------------- cache


def cache_key(content_hash: str, tokenizer, eos_id: int, eval_fraction: float, split: bool = True,
              rendering: list | None = None) -> str:
    prefix, suffix = special_tokens(tokenizer)
    parts = [FORMAT_VERSION, content_hash, tokenizer_fingerprint(tokenizer), int(eos_id), prefix, suffix,
             float(eval_fraction) if split else "unsplit"]
    if rendering is not None:  # a chat source: the template and the targets change the tokens and masks
        parts.append(rendering)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _open_array(path: Path, dtype: str, n: int) -> np.ndarray:
    if path.stat().st_size != n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: size does not match meta.json")
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _load_entry(where: Path) -> tuple[dict, dict] | None:
    """The entry's arrays by name (masks and starts None when it has none) and meta, or None if it is
    missing or damaged (never half-loaded)."""
    try:
        meta = json.loads((where / "meta.json").read_text())
        arrays = {}
        for name in ("train", "eval"):
            arrays[name] = _open_array(where / f"{name}.bin", meta["dtype"], meta[f"{name}_tokens"])
            arrays[f"{name}_mask"] = (_open_array(where / f"{name}.mask.bin", "uint8", meta[f"{name}_tokens"])
                                      if meta["masked"] else None)
            arrays[f"{name}_starts"] = (_open_array(where / f"{name}.starts.bin", "int64", meta[f"{name}_docs"])
                                        if meta.get("starts") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays, meta


def _tokenize_into(folder: Path, spec: SourceSpec, cache_dir: Path, identity: SourceIdentity, tokenizer,
                   eos_id: int, eval_fraction: float, split: bool) -> None:
    prefix, suffix = special_tokens(tokenizer)
    closing = closing_tokens(suffix, eos_id)
    dtype = token_dtype(tokenizer, eos_id)
    encode = encoder(tokenizer)
    chat = spec.format in ("chat", "preference")
    renderer = ChatRenderer(tokenizer, where=spec.source) if chat else None

    def rendered(pieces):
        """A chat example as (text, loss) segments, a preference pair as two such documents (the prompt with each
        reply, only the reply a target); split_pieces has already decided the side on the whole example."""
        for held, piece in pieces:
            if isinstance(piece, PreferencePair):
                for conversation in piece.conversations():
                    yield held, renderer.segments(conversation, "last")
            else:
                yield held, renderer.segments(piece.messages, spec.assistant_turns) if isinstance(piece, Chat) else piece

    def one_pass(held_out: HeldOut | None) -> tuple[SplitFile, SplitFile, Tally]:
        tally = Tally()
        docs = iter_documents(spec, cache_dir, log=_quiet, tally=tally)
        pieces = split_pieces(docs, held_out) if held_out is not None else whole_pieces(docs)
        pieces = rendered(pieces) if chat else pieces
        files = (SplitFile(folder, "train", dtype, identity.masked, starts=chat),
                 SplitFile(folder, "eval", dtype, identity.masked, starts=chat))
        try:
            write_pieces(pieces, *files, encode, prefix, closing)
        finally:
            for f in files:
                f.close()
        if tally.content_hash != identity.content_hash:
            # Edited while we read it, or edited keeping size and mtime (so the stat index did not see it).
            forget_source_index(spec, cache_dir)
            raise DataError(f"{spec.source}: changed while it was being read; run again")
        return *files, tally

    held_out = HeldOut(eval_fraction) if split else None
    train, held, tally = one_pass(held_out)
    pinned = held_out.fallbacks() if held_out is not None else {}
    if pinned:  # too few units for the rule to put some on each side: pin the fallbacks, write again
        held_out = HeldOut(eval_fraction, pinned)
        train, held, tally = one_pass(held_out)
    meta = {"format_version": FORMAT_VERSION, "domain": spec.domain, "dtype": np.dtype(dtype).name,
            "content_hash": identity.content_hash, "decode_errors": tally.decode_errors,
            "binary_files": tally.binary_files[:3], "binary_count": len(tally.binary_files),
            "eos_id": int(eos_id), "prefix": prefix, "closing": closing, "masked": identity.masked, "starts": chat,
            "chat_template": (("builtin" if renderer.template == BUILTIN_TEMPLATE else "tokenizer") if chat else None),
            "split": split, "eval_fraction": float(eval_fraction) if split else None,
            "units": held_out.units if held_out is not None else None,
            "train_docs": train.docs, "eval_docs": held.docs, "train_bytes": train.bytes, "eval_bytes": held.bytes,
            "train_tokens": train.tokens, "eval_tokens": held.tokens}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _discard(where: Path) -> None:
    """Move a damaged entry out of the way (rename first: another process may be doing the same)."""
    trash = where.with_name(f".broken-{where.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(where, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write_entry(where: Path, fill: Callable[[Path], None]) -> None:
    if where.exists() and _load_entry(where) is None:
        _discard(where)
    tmp = where.with_name(f".tmp-{where.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        try:
            os.rename(tmp, where)
        except OSError:
            if _load_entry(where) is None:  # not another writer that won the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


# Fewer held-out examples than this and the held-out loss is mostly which examples they happen to be.
MIN_HELD_OUT = 20

# ---------------------------------------------------------------- public


def tokenize_source(spec: SourceSpec, tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                    log: Callable = print, split: bool = True) -> TokenizedSource:
    """The source's train/eval tokens, from the cache or tokenized now (and cached). split=False: no
    held-out split, every document goes to eval (an eval-only source scored whole)."""
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    identity = source_identity(spec, cache_dir, log=_quiet)  # warnings: logged below, cached or not
    rendering = None
    if spec.format != "text":  # the template and what is a target change the tokens and masks
        renderer = ChatRenderer(tokenizer)
        if renderer.builtin:
            log("chat data: the tokenizer has no chat template: using the built-in one (saved with the tokenizer)")
        rendering = [renderer.identity, "preference" if spec.format == "preference" else spec.assistant_turns]
    key = cache_key(identity.content_hash, tokenizer, eos_id, eval_fraction, split, rendering)
    where = cache_dir / "tokens" / key
    entry = _load_entry(where)
    cached = entry is not None
    if entry is None:
        _write_entry(where, lambda folder: _tokenize_into(folder, spec, cache_dir, identity, tokenizer, eos_id,
                                                          eval_fraction, split))
        entry = _load_entry(where)
        if entry is None:
            raise RuntimeError(f"{where}: token cache entry unreadable right after writing it")
    arrays, meta = entry
    log_read_warnings(spec.source, meta["decode_errors"], meta["binary_files"], log, meta["binary_count"])
    if split and meta["eval_docs"]:
        warn_small_held_out(spec, meta["eval_docs"], len(arrays["eval"]), eval_fraction, log)
    log(f"data {spec.domain}: {meta['train_docs']:,} train + {meta['eval_docs']:,} eval docs, "
        f"{len(arrays['train']):,} + {len(arrays['eval']):,} tokens, {size(meta['train_bytes'] + meta['eval_bytes'])}, "
        f"{time.perf_counter() - start:.1f}s ({'cached' if cached else 'tokenized'})")
    return TokenizedSource(spec=spec, domain=spec.domain, train=arrays["train"], eval=arrays["eval"],
                           train_bytes=meta["train_bytes"], eval_bytes=meta["eval_bytes"],
                           train_docs=meta["train_docs"], eval_docs=meta["eval_docs"],
                           content_hash=identity.content_hash, cache_key=key, decode_errors=meta["decode_errors"],
                           train_mask=arrays["train_mask"], eval_mask=arrays["eval_mask"],
                           train_starts=arrays["train_starts"], eval_starts=arrays["eval_starts"])


def size(n_bytes: int) -> str:
    """Bytes in human units (a small source is "3.2 KB", not "0.0 MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def warn_small_held_out(spec: SourceSpec, eval_docs: int, eval_tokens: int, eval_fraction: float, log) -> None:
    """A held-out split of a few examples gives a loss that moves with which ones they are: say so."""
    count, unit = {"chat": (eval_docs, "example"), "preference": (eval_docs // 2, "pair")}.get(
        spec.format, (eval_docs, "piece"))
    if count < MIN_HELD_OUT:
        log(f"warning: data {spec.domain}: its held-out split has only {count} {unit}{'s' * (count != 1)} "
            f"({eval_tokens:,} tokens, "
            f"eval_fraction {eval_fraction:g}): too few for its loss to mean much; raise data.eval_fraction, "
            "give more data, or score a separate data.eval source")


def tokenize_sources(specs: list[SourceSpec], tokenizer, eos_id: int, cache_dir: Path, eval_fraction: float,
                     log: Callable = print, split: bool = True) -> list[TokenizedSource]:
    return [tokenize_source(spec, tokenizer, eos_id, cache_dir, eval_fraction, log=log, split=split)
            for spec in specs]
