"""Pieces of text -> token ids (+ loss masks) written to disk, on all cores, in bounded memory.

Every piece (tunelab.data.split) becomes one packed document:
    prefix + ids + closing
prefix and suffix are the special tokens the tokenizer itself puts around a text, and closing the suffix
ending with eos_id (tunelab.tokenizers: special_tokens, closing_tokens). Our own trained byte-level BPE
adds nothing: prefix [], closing [eos_id].

A segmented document is tokenized segment by segment and the ids concatenated. For a source with
any segment whose loss is false, a uint8 mask runs alongside the tokens (1 = a training target):
prefix tokens 0, each segment's tokens its loss, the closing tokens the last segment's loss (so a
trained response learns to stop). Sources without such segments have no mask at all.

For a chat source (its examples are packed whole, data/rows.py), each split also records where every
document starts: an int64 token offset per document, since an example's own text may hold EOS (a
template's end of turn) and EOS cannot mark where examples begin.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tunelab.data.split import Piece

# A batch handed to the Rust encoder, which spreads it over all cores: big enough to keep them
# busy, small enough that the Encoding objects (ids, offsets, masks) stay a bounded amount of memory.
BATCH_DOCS = 256
BATCH_CHARS = 8_000_000
# Longer texts are encoded in chunks cut at line ends: one huge file then uses all cores, and the
# encoder is faster on short strings anyway (measured: a 5 MB file in 1 MB chunks takes 3x as long as in
# 32K chunks). A cut is only taken where it does not change the tokens (see _safe_cut).
PIECE_CHARS = 32_000
# Candidate cuts: a newline with text right before and after it. Byte-level BPE pre-tokenizers glue
# a newline to neighbouring whitespace (indentation, blank lines), where a cut would change the tokens.
_LINE_BEFORE_TEXT = re.compile(r"(?<=\S)\n(?=\S)")


def token_dtype(tokenizer, eos_id: int):
    return np.uint16 if max(len(tokenizer), eos_id + 1) < 2**16 else np.uint32


# ---------------------------------------------------------------- chunks


def _safe_cut(text: str, lo: int, pos: int, end: int, encode) -> int | None:
    """A line end in text[pos:end] where encoding the two sides apart gives the same tokens as
    encoding them together (checked on a window around it), or None if the next few candidates fail."""
    for match, _ in zip(_LINE_BEFORE_TEXT.finditer(text, pos, end), range(20)):
        cut = match.end()
        left, right = text[max(lo, cut - 200):cut], text[cut:min(end, cut + 200)]
        together, left_ids, right_ids = encode([left + right, left, right])
        if together == left_ids + right_ids:
            return cut
    return None


def chunks(text: str, start: int, end: int, encode) -> Iterator[str]:
    """text[start:end] in chunks of about PIECE_CHARS that encode to the same ids as the whole."""
    while end - start > PIECE_CHARS:
        cut = _safe_cut(text, start, start + PIECE_CHARS, end, encode)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    if end > start:
        yield text[start:end]


# ---------------------------------------------------------------- writing


class SplitFile:
    """One split's token file (and mask file for a masked source, document starts for a chat source),
    written in batches, with counts."""

    def __init__(self, folder: Path, name: str, dtype, masked: bool, starts: bool = False):
        self.dtype = dtype
        self.tokens_file = open(folder / f"{name}.bin", "wb")
        self.mask_file = open(folder / f"{name}.mask.bin", "wb") if masked else None
        self.starts_file = open(folder / f"{name}.starts.bin", "wb") if starts else None
        self.tokens = self.docs = self.bytes = 0
        self._ids: list[int] = []
        self._mask_values: list[int] = []  # the mask as runs: value, length
        self._mask_lengths: list[int] = []
        self._starts: list[int] = []

    def start_document(self) -> None:
        self._starts.append(self.tokens + len(self._ids))

    def add(self, ids: list[int], mask: int) -> None:
        self._ids.extend(ids)
        if self.mask_file is not None:
            self._mask_values.append(mask)
            self._mask_lengths.append(len(ids))

    def flush(self) -> None:
        self.tokens_file.write(np.asarray(self._ids, dtype=self.dtype).tobytes())
        self.tokens += len(self._ids)
        if self.mask_file is not None:
            self.mask_file.write(np.repeat(np.asarray(self._mask_values, dtype=np.uint8),
                                           np.asarray(self._mask_lengths, dtype=np.int64)).tobytes())
        if self.starts_file is not None:
            self.starts_file.write(np.asarray(self._starts, dtype=np.int64).tobytes())
        self._ids, self._mask_values, self._mask_lengths, self._starts = [], [], [], []

    def close(self) -> None:
        for f in (self.tokens_file, self.mask_file, self.starts_file):
            if f is not None:
                f.close()


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


_START = object()  # in a batch: a document starts here


def _flush(batch: list[tuple[SplitFile, object, int]], encode, files: Iterable[SplitFile]) -> None:
    encoded = iter(encode([value for _, value, _ in batch if isinstance(value, str)]))
    for out, value, mask in batch:
        if value is _START:
            out.start_document()
            continue
        out.add(next(encoded) if isinstance(value, str) else value, mask)
    for out in files:
        out.flush()


def write_pieces(pieces: Iterable[tuple[bool, Piece]], train: SplitFile, held_out: SplitFile, encode,
                 prefix: list[int], closing: list[int]) -> None:
    """Encode every piece into its split's file: prefix + ids + closing (module docstring)."""
    batch: list[tuple[SplitFile, object, int]] = []  # (file, text to encode or literal ids, mask)
    texts = chars = 0
    for held, piece in pieces:
        out = held_out if held else train
        out.docs += 1
        if out.starts_file is not None:
            batch.append((out, _START, 0))
        if isinstance(piece, tuple):
            segments = [(piece[0], piece[1], piece[2], True)]
        else:
            segments = [(text, 0, len(text), loss) for text, loss in piece]
        if prefix:
            batch.append((out, prefix, 0))
        for text, start, end, loss in segments:
            for chunk in chunks(text, start, end, encode):
                out.bytes += _utf8_len(chunk)
                batch.append((out, chunk, int(loss)))
                texts, chars = texts + 1, chars + len(chunk)
                if texts >= BATCH_DOCS or chars >= BATCH_CHARS:
                    _flush(batch, encode, (train, held_out))
                    batch, texts, chars = [], 0, 0
        batch.append((out, closing, int(segments[-1][3])))
    _flush(batch, encode, (train, held_out))
