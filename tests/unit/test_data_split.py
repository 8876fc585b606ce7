"""The held-out split: one rule by units of text, stable when a source grows, with fallbacks."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from test_data_helpers import WORDS, byte_level_tokenizer, decode_documents, write_docs
from tunelab.config import SourceSpec
from tunelab.data import split_documents, tokenize_source


def make_text(rng: random.Random, lines: int) -> str:
    """Lines that all end with a newline."""
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "\n" for _ in range(lines))


def hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def units(doc: str, size: int = 1024) -> list[str]:
    """The unit rule, written out independently: the shortest run of whole lines with >= size chars."""
    out, current = [], ""
    for line in doc.splitlines(keepends=True):
        current += line
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + [current] if current else out


def char_sides(docs: list[str], train: list[str], held: list[str]) -> list[str]:
    """Per document, 'T' or 'E' for each character, from the train and eval pieces (each list in
    document order). Fails unless the pieces rebuild every document exactly, none crossing two."""
    queues = {"T": list(train), "E": list(held)}
    out = []
    for doc in docs:
        sides, pos = [], 0
        while pos < len(doc):
            for side, queue in queues.items():
                if queue and queue[0] and doc.startswith(queue[0], pos):
                    piece = queue.pop(0)
                    sides.append(side * len(piece))
                    pos += len(piece)
                    break
            else:
                raise AssertionError(f"pieces do not rebuild document {len(out)} at character {pos}")
        out.append("".join(sides))
    assert queues == {"T": [], "E": []}, "pieces left over"
    return out


# ---------------------------------------------------------------- the rule


def test_units_are_whole_lines_of_at_least_1024_characters():
    from tunelab.data.split import unit_spans

    doc = "".join(f"{i:03d} " + "x" * 95 + "\n" for i in range(25))  # 100-character lines
    spans = list(unit_spans(doc))
    assert [doc[s:e] for s, e in spans] == units(doc)
    assert [e - s for s, e in spans] == [1100, 1100, 300]  # 11 lines reach 1024; the rest is the last unit
    assert list(unit_spans("short\ndocument\n")) == [(0, 15)]
    one_line = "y" * 5000  # a single line is never cut
    assert list(unit_spans(one_line)) == [(0, 5000)]


def test_a_unit_is_held_out_by_the_hash_of_its_own_text():
    rng = random.Random(0)
    docs = [make_text(rng, rng.randint(5, 200)) for _ in range(60)]
    train, held = split_documents(docs, 0.2)
    for doc, sides in zip(docs, char_sides(docs, train, held)):
        assert sides == "".join(("E" if hash_fraction(u) < 0.2 else "T") * len(u) for u in units(doc))
    all_units = [u for doc in docs for u in units(doc)]
    assert 0.1 < sum(hash_fraction(u) < 0.2 for u in all_units) / len(all_units) < 0.3


def test_train_and_eval_rebuild_every_document_exactly():
    rng = random.Random(1)
    docs = [make_text(rng, rng.randint(1, 300)) for _ in range(40)] + ["no newline at the end " * 100, "a"]
    docs.append(docs[3])  # a duplicate document splits the same way
    train, held = split_documents(docs, 0.1)
    sides = char_sides(docs, train, held)
    assert sides[3] == sides[-1]
    assert any("E" in s and "T" in s for s in sides)


def test_same_side_units_stay_one_piece_and_a_held_unit_cuts_train_in_two():
    rng = random.Random(2)
    doc = make_text(rng, 2000)
    train, held = split_documents([doc], 0.3)
    sides = char_sides([doc], train, held)[0]
    runs = 1 + sum(a != b for a, b in zip(sides, sides[1:]))
    assert len(train) + len(held) == runs  # one piece per run of same-side units, no more
    assert len(train) >= 2  # held-out units in the middle cut the training text


# ---------------------------------------------------------------- stability


def test_adding_and_removing_documents_moves_no_text():
    rng = random.Random(3)
    docs = [make_text(rng, rng.randint(20, 120)) for _ in range(12)]
    before = dict(zip(docs, char_sides(docs, *split_documents(docs, 0.2))))
    assert any("E" in sides for sides in before.values())  # held out by the rule itself, not a fallback
    more = docs + [make_text(rng, rng.randint(20, 120)) for _ in range(30)]
    fewer = docs[1::2]
    for changed in (more, fewer, list(reversed(more))):
        after = dict(zip(changed, char_sides(changed, *split_documents(changed, 0.2))))
        for doc in set(docs) & set(changed):
            assert after[doc] == before[doc]


def test_growing_folder_keeps_train_text_in_train_through_tokenize_source(tmp_path):
    """End to end: a folder source gains documents; every train (and eval) document stays."""
    tok = byte_level_tokenizer()
    rng = random.Random(4)
    docs = [make_text(rng, rng.randint(20, 80)) for _ in range(8)]
    folder = write_docs(tmp_path / "docs", docs)
    spec = SourceSpec(source=str(folder))
    first = tokenize_source(spec, tok, tok.eos_token_id, tmp_path / "cache", 0.3, log=lambda *a: None)
    write_docs(folder, docs + [make_text(rng, rng.randint(20, 80)) for _ in range(24)])
    second = tokenize_source(spec, tok, tok.eos_token_id, tmp_path / "cache", 0.3, log=lambda *a: None)
    train_before, train_after = decode_documents(tok, first.train), decode_documents(tok, second.train)
    eval_before, eval_after = decode_documents(tok, first.eval), decode_documents(tok, second.eval)
    assert eval_before and len(train_after) > len(train_before)
    assert set(train_before) <= set(train_after)
    assert set(eval_before) <= set(eval_after)


def test_appending_lines_to_a_file_keeps_its_complete_units_where_they_were():
    from tunelab.data.split import unit_spans

    rng = random.Random(5)
    doc = make_text(rng, 600)
    longer = doc + make_text(rng, 300)
    (before,) = char_sides([doc], *split_documents([doc], 0.2))
    (after,) = char_sides([longer], *split_documents([longer], 0.2))
    last_unit_start = list(unit_spans(doc))[-1][0]
    assert "E" in before[:last_unit_start] and "T" in before[:last_unit_start]
    # Only the last, unfinished unit of the old text is decided afresh (its text grew).
    assert after[:last_unit_start] == before[:last_unit_start]


# ---------------------------------------------------------------- fallbacks


def test_fallback_holds_out_the_smallest_hash_when_the_rule_holds_out_nothing():
    rng = random.Random(6)
    docs = [make_text(rng, 30) for _ in range(10)]
    all_units = [u for d in docs for u in units(d)]
    train, held = split_documents(docs, 1e-9)
    assert held == [min(all_units, key=hash_fraction)]
    char_sides(docs, train, held)


def test_fallback_keeps_the_largest_hash_for_training_when_the_rule_holds_out_everything():
    rng = random.Random(7)
    docs = [make_text(rng, 30) for _ in range(10)]
    all_units = [u for d in docs for u in units(d)]
    train, held = split_documents(docs, 1.0)
    assert train == [max(all_units, key=hash_fraction)]
    char_sides(docs, train, held)


@pytest.mark.parametrize("fraction", [1e-9, 0.3, 1.0])
def test_a_source_of_one_unit_is_all_training_text(fraction):
    assert split_documents(["one short document\n"], fraction) == (["one short document\n"], [])


def test_identical_units_all_go_to_one_side_except_the_fallback():
    same = ["identical\n"] * 20  # one hash for all: the rule puts them all on one side
    for fraction in (1e-9, 1.0):
        train, held = split_documents(same, fraction)
        assert sorted((len(train), len(held))) == [1, 19]


# ---------------------------------------------------------------- segmented documents


def test_a_segmented_document_is_one_unit_never_cut():
    segmented = [("Question: " + "why " * 600 + "\n", False), ("Answer: " + "because\n" * 300, True)]
    text = "".join(t for t, _ in segmented)
    plain = make_text(random.Random(9), 400)
    for fraction in (0.01, 0.99):
        train, held = split_documents([segmented, plain], fraction)
        whole, other = (held, train) if hash_fraction(text) < fraction else (train, held)
        assert whole[0] is segmented and segmented not in other  # whole, on the side of its text's hash


def test_tokens_of_a_document_cut_in_pieces_are_separate_documents(tmp_path):
    tok = byte_level_tokenizer()
    doc = make_text(random.Random(8), 1500)
    (tmp_path / "one.txt").write_text(doc)
    src = tokenize_source(SourceSpec(source=str(tmp_path / "one.txt")), tok, tok.eos_token_id, tmp_path / "cache",
                          0.3, log=lambda *a: None)
    train, held = split_documents([doc], 0.3)
    assert len(train) >= 2 and len(held) >= 2
    assert decode_documents(tok, src.train) == train and decode_documents(tok, src.eval) == held
    assert (src.train_docs, src.eval_docs) == (len(train), len(held))
    assert int(np.sum(np.asarray(src.train) == tok.eos_token_id)) == len(train)
