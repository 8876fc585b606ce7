"""The held-out split: one rule for every source, decided by small pieces of text on their own.

Units: a plain document is cut at line ends ("\\n") into units. A unit is the shortest run of whole
lines with at least UNIT_CHARS characters; the last unit of a document is what remains (it may be
shorter), and a document shorter than UNIT_CHARS is one unit. A segmented document (prompt and
response, see readers.py) is one unit, never cut.

Rule: a unit is held out when the first 8 bytes of sha256(its text, UTF-8), read as a fraction of
2**64, fall below `eval_fraction`. The decision depends on the unit's own text only, so adding or
removing documents never moves text between train and eval, and appending to a document never moves
its earlier complete units: only its last, unfinished unit (under UNIT_CHARS characters) changes
text and is decided afresh. The same text always lands on the same side, wherever it appears.

Fallbacks, so a small source still has text on both sides: if the rule holds out no unit of the
source, the unit with the smallest hash is held out; if it holds out all of them, the one with the
largest hash goes to train (ties: the first such unit). A source of one unit therefore has no eval
text. The fallbacks need the whole source, so a stream that needs one is split a second time with
the decision pinned (only small sources, in practice: 1000 units = 1 MB leave none held out at
eval_fraction 0.02 with probability 2e-9).

Pieces: consecutive units of a document on the same side form one piece. A held-out unit in the
middle of a document cuts its training text in two pieces; each piece is packed as a document of
its own (with its own separator), so no false continuity is created; the same for eval pieces.
Train and eval pieces together are exactly the documents.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Union

from tunelab.data.readers import Document, document_text

UNIT_CHARS = 1024

# A piece: a span (document, start, end) of a plain document, or a whole segmented document.
Piece = Union[tuple[str, int, int], list[tuple[str, bool]]]


def hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def unit_spans(doc: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each unit of a plain document."""
    start = 0
    while start < len(doc):
        # The unit ends with the line holding its UNIT_CHARS-th character (or with the document).
        end = doc.find("\n", start + UNIT_CHARS - 1) + 1 or len(doc)
        yield start, end
        start = end


class HeldOut:
    """Decides units in stream order and remembers what the fallbacks need. `pinned` maps unit numbers
    (0, 1, ... over the whole source) to a decision that replaces the rule's (from `fallbacks()`)."""

    def __init__(self, eval_fraction: float, pinned: dict[int, bool] | None = None):
        self.eval_fraction = eval_fraction
        self.pinned = dict(pinned or {})
        self.units = 0
        self.held = 0  # by the rule, before pinning
        self.lowest: tuple[float, int] | None = None  # (hash fraction, unit number)
        self.highest: tuple[float, int] | None = None

    def __call__(self, text: str) -> bool:
        score, number = hash_fraction(text), self.units
        self.units += 1
        if self.lowest is None or score < self.lowest[0]:
            self.lowest = (score, number)
        if self.highest is None or score > self.highest[0]:
            self.highest = (score, number)
        held = score < self.eval_fraction
        self.held += held
        return self.pinned.get(number, held)

    def fallbacks(self) -> dict[int, bool]:
        """The decisions to pin for a second pass; {} when the rule already put units on both sides."""
        if not self.units:
            return {}
        rule = {self.lowest[1]: self.lowest[0] < self.eval_fraction,
                self.highest[1]: self.highest[0] < self.eval_fraction}
        pinned, held = {}, self.held
        if held == 0:
            pinned[self.lowest[1]] = True
            held = 1
        if held == self.units:
            pinned[self.highest[1]] = False
        return {unit: side for unit, side in pinned.items() if side != rule[unit]}


def split_pieces(docs: Iterable[Document], held_out: HeldOut) -> Iterator[tuple[bool, Piece]]:
    """(held out?, piece) for every piece of every document, in order."""
    for doc in docs:
        if not isinstance(doc, str):
            yield held_out(document_text(doc)), doc
            continue
        side, begin = None, 0
        for start, end in unit_spans(doc):
            held = held_out(doc[start:end])
            if side is not None and held != side:
                yield side, (doc, begin, start)
                begin = start
            side = held
        yield side, (doc, begin, len(doc))


def whole_pieces(docs: Iterable[Document]) -> Iterator[tuple[bool, Piece]]:
    """No split (an eval-only source scored whole): every document is one held-out piece."""
    for doc in docs:
        yield True, (doc, 0, len(doc)) if isinstance(doc, str) else doc


def piece_document(piece: Piece) -> Document:
    return piece[0][piece[1]:piece[2]] if isinstance(piece, tuple) else piece


def split_documents(docs: Iterable[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, eval) pieces of one source's documents, as documents, by the rule above."""
    docs = list(docs)
    held_out = HeldOut(eval_fraction)
    pieces = list(split_pieces(docs, held_out))
    pinned = held_out.fallbacks()
    if pinned:
        pieces = list(split_pieces(docs, HeldOut(eval_fraction, pinned)))
    return ([piece_document(p) for held, p in pieces if not held],
            [piece_document(p) for held, p in pieces if held])
