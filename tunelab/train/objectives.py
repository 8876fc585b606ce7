"""Turn packed token windows into model inputs with labels, per training objective.

Labels follow HF's convention: -100 is not a target, and causal models shift labels inside the
model (label t is predicted from tokens < t). A window's `loss_mask` (from the token cache:
1 = target) turns masked tokens into -100, in training and evaluation alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch


def sequence_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is not stable across processes)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def trim_after_last_target(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal-LM batch without its trailing columns that hold no target in any row (the padding of chat rows).

    Exact: a column's logits depend only on the columns before it, and a dropped column has no label, so the
    loss and every gradient are those of the full batch; `packing: pad` then costs the longest example of
    the micro-batch, not seq_len."""
    targets = (batch["labels"] != -100).any(dim=0)
    if not bool(targets.any()):
        return batch
    end = int(targets.nonzero().max()) + 1
    if end == targets.numel():
        return batch
    return {k: (v[:, :end] if v.dim() == 2 and v.shape[1] == targets.numel() else v) for k, v in batch.items()}


def add_labels(batch: dict[str, torch.Tensor], objective: str, *, mask_id: int | None = None,
               mlm_probability: float = 0.15, vocab_size: int = 0, special_ids: list[int] | None = None,
               seeds: list[int] | None = None, word_table: WordTable | None = None) -> dict[str, torch.Tensor]:
    """clm: labels = inputs. mlm: BERT's 80/10/10 masking, row i drawn from a generator seeded by seeds[i].

    MLM masks are keyed per sequence (the loop passes a seed from the run seed, the step and the
    sequence's position in the global batch), so they are the same for any number of processes
    or micro-batch split, and a resumed run draws the same masks without any saved RNG state.
    With `word_table` (whole-word masking), words are chosen with probability mlm_probability and
    every token of a chosen word is a target; the 80/10/10 replacement is still drawn per token.
    """
    batch = dict(batch)
    loss_mask = batch.pop("loss_mask", None)
    ids = batch["input_ids"]
    if objective == "clm":
        labels = ids.clone()
        if loss_mask is not None:
            labels[loss_mask == 0] = -100
        return {**batch, "labels": labels}
    if mask_id is None:
        raise ValueError("mlm needs a mask token")
    if seeds is None or len(seeds) != ids.shape[0]:
        raise ValueError("mlm needs one seed per sequence")
    prob = torch.full(ids.shape, mlm_probability)
    if special_ids:
        prob[torch.isin(ids, torch.tensor(special_ids))] = 0.0
    if loss_mask is not None:
        prob[loss_mask == 0] = 0.0
    words = None if word_table is None else word_index(ids, word_table, prob > 0)
    chosen, roll, random_tokens = [], [], []
    for row, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        if words is None:
            chosen.append(torch.bernoulli(prob[row], generator=gen).bool())
        else:  # one draw per word (row i has at most seq_len words), shared by all of the word's tokens
            picked = torch.rand(ids.shape[1], generator=gen) < mlm_probability
            chosen.append(picked[words[row]] & (prob[row] > 0))
        roll.append(torch.rand(ids.shape[1], generator=gen))
        random_tokens.append(torch.randint(vocab_size, (ids.shape[1],), generator=gen))
    chosen, roll, random_tokens = torch.stack(chosen), torch.stack(roll), torch.stack(random_tokens)
    labels = ids.clone()
    labels[~chosen] = -100
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    out = {k: v for k, v in batch.items() if k != "position_ids"}  # BERT uses absolute positions per window
    out.update(input_ids=inputs, labels=labels)
    return out


def count_targets(batch: dict[str, torch.Tensor], objective: str) -> int:
    """Tokens the loss averages over (a causal model has no target for the first position)."""
    labels = batch["labels"][:, 1:] if objective == "clm" else batch["labels"]
    return int((labels != -100).sum())


def fixed_mlm_labeler(mask_id: int, vocab_size: int, special_ids: list[int], mlm_probability: float = 0.15,
                      word_table: WordTable | None = None):
    """Evaluation masks keyed on each window's index in the split: every evaluation of every model,
    at any batch size, scores the same masked positions, so MLM losses compare across steps and runs.
    `word_table`: whole-word masks, as the run trained with."""
    def label(batch: dict[str, torch.Tensor], window_indices: list[int]) -> dict[str, torch.Tensor]:
        return add_labels(batch, "mlm", mask_id=mask_id, mlm_probability=mlm_probability, vocab_size=vocab_size,
                          special_ids=special_ids, seeds=[sequence_seed(-1, i) for i in window_indices],
                          word_table=word_table)
    return label


# ---------------------------------------------------------------- whole-word masking
#
# Where a word starts is read off the token strings, per tokenizer family:
#   WordPiece (BERT): a token without the "##" continuation prefix starts a word (BERT's pre-tokenizer
#     already splits punctuation off, so "foo", "_", "bar" are three words and "token ##ization" one).
#   SentencePiece / Metaspace: a token starting with "▁" (a space) starts a word.
#   Byte-level BPE with the GPT-2 split rule (GPT-2, RoBERTa, our own tokenizers): the pre-tokenizer cuts
#     text into an optional space + letters / + digits / + other symbols, contractions ('s) and whitespace
#     runs, and no token crosses a cut. So a token starting with a space and going on with something else
#     starts a word; a token continues the previous one when that one ends with a bare space (the space
#     belongs to what follows), when both are whitespace, or when both sides of the join are of one class
#     (letters, digits, symbols; an apostrophe joins letters after it, as in 's); a non-ASCII byte joins
#     anything but whitespace (multi-byte characters, and a letter-or-symbol question the bytes cannot
#     answer). Any other join is a cut.
#   Byte-level BPE with another split rule (a Split pre-tokenizer, as Llama 3's): only a space followed by
#     something else starts a word.
# Where the rules are unsure they join, so a "word" may be coarser than the pre-tokenizer's piece, never
# finer. Special and added tokens are words of their own (never masked: they are excluded from the
# targets), so the token after them starts a word too (a document's first word after EOS has no space).

(_ORDINARY, _BOUNDARY, _LETTER, _DIGIT, _SYMBOL, _SPACE, _WHITESPACE, _HIGH, _QUOTE, _WS_ONLY) = range(10)
_CLASSES = 10


@dataclass(frozen=True)
class WordTable:
    """Per token id: whether it starts a word, and the classes of its first and last character.

    Tokens t-1, t are in one word unless starts[t], or joins[last[t-1], first[t]] is False."""
    starts: torch.Tensor  # bool [vocab]
    first: torch.Tensor  # int64 [vocab]: a class above
    last: torch.Tensor  # int64 [vocab]
    joins: torch.Tensor  # bool [classes, classes]
    scheme: str  # wordpiece | metaspace | bytelevel | bytelevel-split


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: each printable Latin-1 byte stands for itself, every other byte
    (controls, space, non-breaking space, soft hyphen) for chr(256 + its rank among those)."""
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _byte_class(b: int) -> int:
    if b == 0x20:
        return _SPACE
    if chr(b) in "\t\n\r\x0b\x0c":
        return _WHITESPACE
    if b >= 0x80:
        return _HIGH
    return _LETTER if chr(b).isalpha() else _DIGIT if chr(b).isdigit() else _SYMBOL


def _tokenizer_scheme(tokenizer, tokens: list[str]) -> tuple[str, str]:
    """(scheme, marker): from the fast tokenizer's own description, else from the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "WordPiece" or model.get("continuing_subword_prefix"):
            return "wordpiece", model.get("continuing_subword_prefix") or "##"
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "bytelevel", "\u0120"
        if '"ByteLevel"' in json.dumps([pre, spec.get("decoder")]):
            return "bytelevel-split", "\u0120"
        if '"Metaspace"' in json.dumps([pre, spec.get("decoder")]) or model.get("type") == "Unigram":
            return "metaspace", "\u2581"
    counts = {marker: sum(t.startswith(marker) for t in tokens) for marker in ("##", "\u0120", "\u2581")}
    marker, n = max(counts.items(), key=lambda kv: kv[1])
    if n < 0.05 * max(1, len(tokens)):
        from tunelab.errors import ModelError

        raise ModelError("objective.options.whole_word_masking: cannot tell where words start in this tokenizer (not "
                         "WordPiece, SentencePiece or byte-level BPE): set it to false")
    return {"##": "wordpiece", "\u0120": "bytelevel-split", "\u2581": "metaspace"}[marker], marker


def _byte_level_entry(token: str, chars: dict[str, int], gpt2_split: bool) -> tuple[bool, int, int]:
    """(starts, first class, last class) of a byte-level token."""
    raw = [chars.get(c, 0x80) for c in token]
    classes = [_byte_class(b) for b in raw]
    if all(c in (_SPACE, _WHITESPACE) for c in classes):
        return False, _WS_ONLY, classes[-1]
    if classes[0] in (_SPACE, _WHITESPACE):
        return True, _SPACE, _ORDINARY if not gpt2_split else (_QUOTE if raw[-1] == 0x27 else classes[-1])
    if not gpt2_split:
        return False, _ORDINARY, _ORDINARY
    return False, classes[0], _QUOTE if raw[-1] == 0x27 else classes[-1]


def word_table(tokenizer) -> WordTable:
    """The word-start table of a tokenizer (all its ids, added tokens included); see the rules above."""
    n = len(tokenizer)
    tokens = [t or "" for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
    scheme, marker = _tokenizer_scheme(tokenizer, tokens)
    alone = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    starts = torch.zeros(n, dtype=torch.bool)
    first = torch.full((n,), _ORDINARY, dtype=torch.int64)
    last = first.clone()
    chars = _byte_level_chars()
    for i, tok in enumerate(tokens):
        if i in alone or not tok:
            starts[i], first[i], last[i] = True, _BOUNDARY, _BOUNDARY
        elif scheme == "wordpiece":
            starts[i] = not tok.startswith(marker)
        elif scheme == "metaspace":  # a byte-fallback whitespace token (<0x0A>) starts a word too
            starts[i] = tok.startswith(marker) or tok in ("<0x09>", "<0x0A>", "<0x0D>", "<0x20>")
        else:
            starts[i], first[i], last[i] = _byte_level_entry(tok, chars, scheme == "bytelevel")
    joins = torch.zeros(_CLASSES, _CLASSES, dtype=torch.bool)
    if scheme != "bytelevel":  # only `starts` (and special tokens) cut
        joins[:, :] = True
        joins[_BOUNDARY, :] = joins[:, _BOUNDARY] = False
    else:
        for c in (_LETTER, _DIGIT, _SYMBOL, _HIGH):  # same class, or a non-ASCII byte on either side
            joins[c, c] = joins[c, _HIGH] = joins[_HIGH, c] = True
        joins[_SPACE, [_LETTER, _DIGIT, _SYMBOL, _HIGH, _WS_ONLY]] = True  # " foo": the space begins the word after it
        joins[_WHITESPACE, _WS_ONLY] = True  # one whitespace run
        joins[_QUOTE, [_LETTER, _SYMBOL, _HIGH]] = True  # 's; '' is one symbol run
    return WordTable(starts=starts, first=first, last=last, joins=joins, scheme=scheme)


def word_index(ids: torch.Tensor, table: WordTable, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Per position, the index of its word within its row (0, 1, ...). A window's first token starts a
    word; a token outside `eligible` (special, or loss-masked) is a word of its own."""
    if ids.numel() and int(ids.max()) >= table.starts.numel():
        raise ValueError(f"token id {int(ids.max())} is beyond the word table ({table.starts.numel()} ids)")
    cut = table.starts[ids].clone()
    cut[:, 1:] |= ~table.joins[table.last[ids[:, :-1]], table.first[ids[:, 1:]]]
    if eligible is not None:
        cut |= ~eligible
        cut[:, 1:] |= ~eligible[:, :-1]
    cut[:, 0] = True
    return torch.cumsum(cut.to(torch.int64), dim=1) - 1
