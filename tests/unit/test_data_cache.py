"""Held-out split, tokenization and the on-disk token cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest

import tunelab.data.tokcache as tokcache
from tunelab.config import SourceSpec
from tunelab.data import split_documents, tokenize_source, tokenize_sources

WORDS = "alpha beta gamma delta token cache eval train split mixture packing window source domain".split()


def make_text(rng: random.Random, lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(lines))


def make_code(rng: random.Random, blocks: int) -> str:
    """Indentation, blank lines, CRLF: where a careless cut between pieces would change the tokens."""
    return "".join(make_text(rng, 3) + "\n    " + make_text(rng, 2) + rng.choice(["\n\n", "\r\n", "\n", "  \n"])
                   for _ in range(blocks))


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with a few hundred tokens and an <|endoftext|> EOS, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(rng, 50) for _ in range(10)] + [make_code(rng, 20)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def run(tmp_path, tokenizer, source, eval_fraction=0.1, log=None, cache="cache"):
    return tokenize_source(SourceSpec(source=str(source)), tokenizer, tokenizer.eos_token_id, tmp_path / cache,
                           eval_fraction, log=log or (lambda *a: None))


def write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def decode_documents(tokenizer, tokens) -> list[str]:
    """Tokens -> texts, cut at each EOS (every document ends with one)."""
    ids = np.asarray(tokens).tolist()
    assert ids and ids[-1] == tokenizer.eos_token_id
    docs, current = [], []
    for i in ids:
        if i == tokenizer.eos_token_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    return docs


def hash_fraction(doc: str) -> float:
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") / 2**64


# ---------------------------------------------------------------- held-out split


def test_hash_split_follows_the_rule_and_is_stable_under_other_documents():
    rng = random.Random(1)
    docs = [make_text(rng, 3) for _ in range(200)]
    train, held = split_documents(docs, 0.1)
    assert held == [d for d in docs if hash_fraction(d) < 0.1]
    assert train == [d for d in docs if hash_fraction(d) >= 0.1]
    assert 5 < len(held) < 40
    # A document's side depends on the document alone: dropping others never moves it.
    train_half, held_half = split_documents(docs[:100], 0.1)
    assert set(held_half) == set(held) & set(docs[:100])
    assert split_documents(docs, 0.1) == (train, held)


def test_hash_split_guarantees_one_document_on_each_side():
    docs = [f"document number {i}" for i in range(25)]
    train, held = split_documents(docs, 1e-9)
    assert held == [min(docs, key=hash_fraction)] and len(train) == 24
    same = ["identical"] * 20  # all share one hash: all would go to one side
    train, held = split_documents(same, 0.49)
    assert len(train) >= 1 and len(held) >= 1 and len(train) + len(held) == 20


def test_few_documents_split_at_a_line_boundary():
    doc = "".join(f"line {i:02d} of the document\n" for i in range(50))
    train, held = split_documents([doc], 0.1)
    assert train[0] + held[0] == doc
    assert train[0].endswith("\n") and held[0].startswith("line ")  # whole lines
    assert 0.1 <= len(held[0]) / len(doc) < 0.1 + 30 / len(doc)  # the last tenth, rounded up to a line


def test_few_documents_split_edge_cases():
    single_line = "word " * 100
    train, held = split_documents([single_line], 0.1)
    assert train[0] + held[0] == single_line and len(held[0].strip()) > 0 and "\n" not in held[0]
    long_first_line = "x" * 1000 + "\nlast line\n"
    train, held = split_documents([long_first_line], 0.02)
    assert train == ["x" * 1000 + "\n"] and held == ["last line\n"]
    train, held = split_documents(["a"], 0.1)  # too short to split: training keeps it
    assert (train, held) == (["a"], [])


def test_few_documents_each_contribute_to_both_splits():
    rng = random.Random(2)
    docs = [make_text(rng, 30) for _ in range(5)]
    train, held = split_documents(docs, 0.2)
    assert len(train) == len(held) == 5
    assert [t + h for t, h in zip(train, held)] == docs


# ---------------------------------------------------------------- tokenization


def test_tokens_decode_back_to_the_documents(tmp_path, tokenizer):
    rng = random.Random(3)
    docs = [make_text(rng, 5) for _ in range(30)]
    src = run(tmp_path, tokenizer, write_docs(tmp_path / "docs", docs))
    train, held = split_documents(docs, 0.1)
    assert decode_documents(tokenizer, src.train) == train
    assert decode_documents(tokenizer, src.eval) == held
    assert (src.train_docs, src.eval_docs) == (len(train), len(held))
    assert src.train_bytes == sum(len(d.encode()) for d in train)
    assert src.eval_bytes == sum(len(d.encode()) for d in held)
    assert isinstance(src.train, np.memmap) and src.train.dtype == np.uint16 and src.train.mode == "r"
    assert src.domain == "docs" and len(src.content_hash) == 64


def test_single_big_file_is_split_and_tokenized_like_the_tokenizer_does(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokcache, "PIECE_CHARS", 500)  # force many pieces, each cut at a safe line end
    text = make_code(random.Random(4), 150)
    (tmp_path / "big.txt").write_bytes(text.encode())  # bytes: keep the CRLFs
    src = run(tmp_path, tokenizer, tmp_path / "big.txt", eval_fraction=0.05)
    train, held = split_documents([text], 0.05)
    eos = tokenizer.eos_token_id
    assert np.asarray(src.train).tolist() == tokenizer(train[0], add_special_tokens=False)["input_ids"] + [eos]
    assert np.asarray(src.eval).tolist() == tokenizer(held[0], add_special_tokens=False)["input_ids"] + [eos]
    assert len(list(tokcache._pieces(train[0], tokcache._encoder(tokenizer)))) > 10


def test_backend_truncation_left_on_by_the_caller_is_ignored(tmp_path, tokenizer):
    import copy

    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(max_length=4)
    (tmp_path / "t.txt").write_text(make_text(random.Random(5), 20))
    assert np.array_equal(run(tmp_path, truncating, tmp_path / "t.txt").train,
                          run(tmp_path, tokenizer, tmp_path / "t.txt", cache="other").train)


class CharTokenizer:
    """A slow (non-fast) tokenizer: one id per character."""

    is_fast = False
    eos_token_id = 0

    def __len__(self):
        return 300

    def get_vocab(self):
        return {chr(i): i for i in range(1, 300)}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}  # ASCII only in this test


def test_slow_tokenizer_fallback(tmp_path):
    (tmp_path / "t.txt").write_text("abc\ndef\n")
    tok = CharTokenizer()
    src = tokenize_source(SourceSpec(source=str(tmp_path / "t.txt")), tok, 0, tmp_path / "cache", 0.3,
                          log=lambda *a: None)
    assert np.asarray(src.train).tolist() == [ord(c) for c in "abc\n"] + [0]
    assert np.asarray(src.eval).tolist() == [ord(c) for c in "def\n"] + [0]


def test_decode_errors_are_reported(tmp_path, tokenizer):
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\nline three\n")
    assert run(tmp_path, tokenizer, tmp_path / "bad.txt").decode_errors == 1


# ---------------------------------------------------------------- cache


def test_second_call_is_a_cache_hit_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    folder = write_docs(tmp_path / "docs", [make_text(random.Random(i), 4) for i in range(25)])
    logged = []
    first = run(tmp_path, tokenizer, folder, log=logged.append)
    assert "tokenized" in logged[-1] and "docs" in logged[-1]

    def no_encoding(_tokenizer):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(tokcache, "_encoder", no_encoding)
    second = run(tmp_path, tokenizer, folder, log=logged.append)
    assert "cached" in logged[-1]
    assert second.cache_key == first.cache_key and np.array_equal(second.train, first.train)
    entry = tmp_path / "cache" / "tokens" / first.cache_key
    assert sorted(p.name for p in entry.iterdir()) == ["eval.bin", "meta.json", "train.bin"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["train_tokens"] == len(first.train)
    assert meta["content_hash"] == first.content_hash and meta["domain"] == "docs"


def test_changed_inputs_give_a_new_key(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("one line\nanother line\n")
    key = run(tmp_path, tokenizer, path).cache_key
    assert run(tmp_path, tokenizer, path, eval_fraction=0.2).cache_key != key
    path.write_text("one line\nanother line, edited\n")
    assert run(tmp_path, tokenizer, path).cache_key != key
    tokens_dir = tmp_path / "cache" / "tokens"
    assert len([p for p in tokens_dir.iterdir() if not p.name.startswith(".")]) == 3


def test_leftover_temp_dir_and_damaged_entry_are_harmless(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text(make_text(random.Random(6), 30))
    good = run(tmp_path, tokenizer, path, cache="reference")
    tokens_dir = tmp_path / "cache" / "tokens"
    crashed = tokens_dir / f".tmp-{good.cache_key}-12345-deadbeef"
    crashed.mkdir(parents=True)
    (crashed / "train.bin").write_bytes(b"\x01\x02\x03")  # a writer killed halfway
    damaged = tokens_dir / good.cache_key  # an entry cut short (say, by a bad copy)
    damaged.mkdir()
    (damaged / "train.bin").write_bytes(b"\x01")
    (damaged / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": 99, "eval_tokens": 1}))
    src = run(tmp_path, tokenizer, path)
    assert np.array_equal(src.train, good.train) and np.array_equal(src.eval, good.eval)
    leftovers = sorted(p.name for p in tokens_dir.iterdir() if p.name.startswith("."))
    assert leftovers == [crashed.name]  # other writers' temp dirs are never touched


def test_losing_a_race_uses_the_winners_entry(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(make_text(random.Random(7), 30))
    winner = run(tmp_path, tokenizer, path, cache="winner")
    final = tmp_path / "cache" / "tokens" / winner.cache_key
    real_rename = os.rename

    def rename_after_another_rank(src, dst):
        if str(dst) == str(final):  # another process installs the same entry just before us
            shutil.copytree(tmp_path / "winner" / "tokens" / winner.cache_key, final)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_another_rank)
    src = run(tmp_path, tokenizer, path)
    assert np.array_equal(src.train, winner.train)
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # our temp dir is cleaned up


def test_tokenize_sources_keeps_order_and_domains(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first source\nline two\n")
    (tmp_path / "b.txt").write_text("second source\nline two\n")
    specs = [SourceSpec(source=str(tmp_path / "b.txt")), SourceSpec(source=str(tmp_path / "a.txt"), name="named")]
    out = tokenize_sources(specs, tokenizer, tokenizer.eos_token_id, tmp_path / "cache", 0.3, log=lambda *a: None)
    assert [s.domain for s in out] == ["b", "named"] and [s.spec for s in out] == specs
