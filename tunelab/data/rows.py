"""Whole examples packed into fixed-length rows: how a chat source is batched without leakage.

A chat source's tokens are a flat array with a start offset per example (the token cache keeps them;
tunelab.data.encode). Packing them as a text stream (tunelab.data.packing) would cut examples across
sequences, so a reply could land in a row without its question. Here every example stays whole:

    packing: document   several examples per row: best-fit decreasing (longest first, each into the
                        fullest row it fits), then each row's examples in source order; deterministic
    packing: pad        one example per row

A row is its examples back to back, then padding (EOS ids, loss mask 0) to `seq_len`. Position ids
restart at 0 for every example and for the padding; with no attention mask and no KV cache,
transformers turns restarting position ids into a block-diagonal causal mask (find_packed_sequence_indices
in masking_utils, for eager, sdpa and flash attention alike), so an example attends only to itself
and its logits equal its logits alone (tests/unit/test_chat_data.py checks this for eager and sdpa).
Padding comes after every example of its row, so no example attends to it.

Examples longer than `seq_len` (truncation policy): the example keeps its last `seq_len` tokens (the
start of its prompt, or earlier turns, is cut) as long as its last reply still has at least one prompt
token before it; otherwise (the last reply alone does not fit) it is dropped. Both are counted and
reported by `describe()`, which build_data logs as a warning; nothing is cut silently.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Truncation:
    examples: int = 0  # examples in the split
    cut: int = 0  # longer than seq_len, cut from the left
    dropped: int = 0  # longer than seq_len, and the last reply does not fit with a token of its prompt


def truncated_spans(n_tokens: int, starts: np.ndarray, mask: np.ndarray | None, seq_len: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Truncation]:
    """(start, end, kept?) of every example, the start moved so that a kept example fits seq_len; the counts."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], n_tokens)
    lengths = ends - starts
    stats = Truncation(examples=len(starts))
    keep_start = starts.copy()
    keep = np.ones(len(starts), dtype=bool)
    for i in np.flatnonzero(lengths > seq_len):  # a few, usually: a Python loop is fine
        start, end = int(starts[i]), int(ends[i])
        cut = end - seq_len
        if mask is None:  # everything is a target: keep the end
            first_of_last_reply = end
        else:  # the start of the last run of targets: the last reply (and its end-of-turn tokens)
            m = np.asarray(mask[start:end])
            targets = np.flatnonzero(m)
            if len(targets) == 0:
                first_of_last_reply = end
            else:
                gaps = np.flatnonzero(m[:targets[-1]] == 0)
                first_of_last_reply = start + (int(gaps[-1]) + 1 if len(gaps) else 0)
        if cut < first_of_last_reply:  # at least one prompt token stays before the last reply
            keep_start[i] = cut
            stats.cut += 1
        else:
            keep[i] = False
            stats.dropped += 1
    return keep_start, ends, keep, stats


def truncation_warning(name: str, total: int, unit: str, cut: int, dropped: int, seq_len: int, dropped_why: str) -> str:
    """The one warning of the truncation policy, for examples and for preference pairs."""
    return (f"warning: {name}: {cut + dropped:,} of {total:,} {unit} are longer than data.seq_len={seq_len}: {cut:,} "
            f"cut from the left (the start of their prompt is lost), {dropped:,} dropped ({dropped_why})")


def example_spans(n_tokens: int, starts: np.ndarray, mask: np.ndarray | None, seq_len: int
                  ) -> tuple[np.ndarray, np.ndarray, Truncation]:
    """(start, end) token offsets of every example that is kept, truncated to seq_len, and the counts."""
    start, end, keep, stats = truncated_spans(n_tokens, starts, mask, seq_len)
    return start[keep], end[keep], stats


def pack_rows(lengths: np.ndarray, seq_len: int, one_per_row: bool) -> list[list[int]]:
    """Example indices of each row. Best-fit decreasing: examples longest first, each into the row with the
    least room that still fits it (a new row if none does); each row then lists its examples in order."""
    if one_per_row:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        need = int(lengths[i])
        j = bisect.bisect_left(room, (need, -1))
        if j < len(room):
            free, row = room.pop(j)
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - need > 0:
            bisect.insort(room, (free - need, row))
    return [sorted(r) for r in rows]


class ExampleRows:
    """Row i = its examples back to back + padding, as int64 `input_ids`, `position_ids`, `loss_mask`.

    The same interface as PackedSequences (len, [i], seq_len, loss_mask), so batches, mixtures and
    evaluation take either."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, loss_mask: np.ndarray | None, seq_len: int,
                 pad_id: int, one_per_row: bool = False):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
        self.tokens, self.loss_mask, self.seq_len, self.pad_id = tokens, loss_mask, seq_len, int(pad_id)
        self.span_start, self.span_end, self.truncation = example_spans(len(tokens), starts, loss_mask, seq_len)
        self.rows = pack_rows(self.span_end - self.span_start, seq_len, one_per_row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range (0..{len(self) - 1})")
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.seq_len, dtype=np.int64)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for e in self.rows[i]:
            start, end = int(self.span_start[e]), int(self.span_end[e])
            n = end - start
            ids[at:at + n] = self.tokens[start:end]
            mask[at:at + n] = 1 if self.loss_mask is None else self.loss_mask[start:end]
            positions[at:at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(self.seq_len - at)  # the padding: a run of its own
        return {"input_ids": ids, "position_ids": positions, "loss_mask": mask}

    def efficiency(self) -> tuple[float, float]:
        """(example tokens, target tokens) as shares of all row tokens (the rest is padding or context)."""
        total = max(1, len(self) * self.seq_len)
        used = int((self.span_end - self.span_start).sum())
        if self.loss_mask is None:
            return used / total, used / total
        targets = sum(int(np.count_nonzero(self.loss_mask[s:e])) for s, e in zip(self.span_start, self.span_end))
        return used / total, targets / total

    def describe(self, name: str, packing: str) -> list[str]:
        """Log lines: the packing's efficiency, and (a warning) the examples truncation cut or dropped."""
        used, targets = self.efficiency()
        t = self.truncation
        lines = [f"data {name}: {t.examples - t.dropped:,} examples in {len(self):,} rows of {self.seq_len} "
                 f"(packing {packing}): {used:.1%} of row tokens are example tokens, {targets:.1%} are targets"]
        if t.cut or t.dropped:
            lines.append(truncation_warning(name, t.examples, "examples", t.cut, t.dropped, self.seq_len,
                                            "their last reply does not fit with its prompt"))
        return lines


def packed_sequences(tokens: np.ndarray, seq_len: int, eos_id: int, packing: str, loss_mask: np.ndarray | None = None,
                     starts: np.ndarray | None = None):
    """The training sequences of one source: whole examples in rows for a chat source (document starts
    known) under packing document or pad; else fixed windows over the stream (tunelab.data.packing),
    position ids restarting per document unless packing is concat."""
    from tunelab.data.packing import PackedSequences

    if starts is not None and packing in ("document", "pad"):
        return ExampleRows(tokens, starts, loss_mask, seq_len, pad_id=eos_id, one_per_row=packing == "pad")
    return PackedSequences(tokens, seq_len, eos_id, packing != "concat", loss_mask=loss_mask)


# ---------------------------------------------------------------- preference pairs


class PairSet:
    """The preference pairs of one split. The token cache writes pair i as documents 2i (prompt + chosen reply)
    and 2i + 1 (prompt + rejected reply), the replies as targets. Each document is truncated by the rule above;
    a pair loses both documents when either is dropped, and a pair whose two documents are the same tokens
    (chosen = rejected: it carries no preference) is skipped. Both are counted and reported by `describe()`."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, loss_mask: np.ndarray, seq_len: int):
        if len(starts) % 2:
            raise ValueError(f"a preference split holds pairs of documents, got {len(starts)} documents")
        self.tokens, self.loss_mask, self.seq_len = tokens, loss_mask, seq_len
        start, end, keep, _ = truncated_spans(len(tokens), starts, loss_mask, seq_len)  # counted per pair below
        full_start = np.asarray(starts, dtype=np.int64).reshape(-1, 2)
        full_end = np.append(np.asarray(starts[1:], dtype=np.int64), len(tokens)).reshape(-1, 2)
        self.pairs = len(full_start)
        self.identical = np.array([np.array_equal(tokens[a:b], tokens[c:d])
                                   for (a, c), (b, d) in zip(full_start, full_end)], dtype=bool)
        kept = keep.reshape(-1, 2).all(axis=1)
        self.dropped = int((~kept).sum())
        self.cut = int(((start != np.asarray(starts)).reshape(-1, 2).any(axis=1) & kept).sum())
        index = np.flatnonzero(kept & ~self.identical)
        self.start, self.end = start.reshape(-1, 2)[index], end.reshape(-1, 2)[index]

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, i: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((chosen ids, chosen mask), (rejected ids, rejected mask)) of pair i."""
        return tuple((np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.loss_mask[a:b], dtype=np.int64))
                     for a, b in zip(self.start[i], self.end[i]))

    def tokens_of(self, i: int) -> int:
        return int((self.end[i] - self.start[i]).sum())

    def describe(self, name: str) -> list[str]:
        lines = [f"data {name}: {len(self):,} preference pairs of {self.pairs:,} (each reply at most "
                 f"data.seq_len={self.seq_len} tokens with its prompt)"]
        if self.cut or self.dropped:
            lines.append(truncation_warning(name, self.pairs, "pairs", self.cut, self.dropped, self.seq_len,
                                            "a reply does not fit with a token of its prompt"))
        if self.identical.any():
            lines.append(f"warning: {name}: {int(self.identical.sum()):,} pairs have the same chosen and rejected "
                         "reply and are skipped (they carry no preference); fix or remove them")
        return lines


def collate_pairs(pairs: list, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of pairs as rows: the chosen replies first, then the rejected ones in the same order, each padded
    on the right (pad_id, mask 0) to the longest. Causal attention never looks right, so no row attends to its
    padding and no attention mask is needed."""
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = ids
        loss_mask[r, :len(ids)] = mask
    return {"input_ids": input_ids, "loss_mask": loss_mask}
