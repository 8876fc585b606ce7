"""Tokenization and the on-disk token cache (the split rule itself: test_data_split.py)."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import tunelab.data.encode as encode
import tunelab.data.tokcache as tokcache
from test_data_helpers import age, byte_level_tokenizer, decode_documents, make_code, make_text, write_docs
from tunelab.config import SourceSpec
from tunelab.data import split_documents, tokenize_source, tokenize_sources
from tunelab.tokenizers import encoder


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with a few hundred tokens and an <|endoftext|> EOS, trained in milliseconds."""
    return byte_level_tokenizer()


def run(tmp_path, tokenizer, source, eval_fraction=0.1, log=None, cache="cache"):
    return tokenize_source(SourceSpec(source=str(source)), tokenizer, tokenizer.eos_token_id, tmp_path / cache,
                           eval_fraction, log=log or (lambda *a: None))


@pytest.fixture
def forbid_reading(monkeypatch):
    """forbid_reading(root): from now on, opening any file under `root` from Python fails the test."""
    real_open = builtins.open

    def start(root: Path):
        root = Path(root).resolve()

        def guarded(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(root):
                raise AssertionError(f"opened {file}: the source should not have been read")
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded)
        monkeypatch.setattr(io, "open", guarded)  # pathlib's read_bytes/read_text go through io.open

    return start


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
    monkeypatch.setattr(encode, "PIECE_CHARS", 500)  # force many chunks, each cut at a safe line end
    text = make_code(random.Random(4), 600)
    (tmp_path / "big.txt").write_bytes(text.encode())  # bytes: keep the CRLFs
    src = run(tmp_path, tokenizer, tmp_path / "big.txt", eval_fraction=0.2)
    train, held = split_documents([text], 0.2)
    eos = tokenizer.eos_token_id
    assert len(train) > 1 and held
    for tokens, pieces in ((src.train, train), (src.eval, held)):
        assert np.asarray(tokens).tolist() == [t for piece in pieces
                                               for t in tokenizer(piece, add_special_tokens=False)["input_ids"] + [eos]]
    longest = max(train, key=len)
    assert len(list(encode.chunks(longest, 0, len(longest), encoder(tokenizer)))) > 5


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
    text = make_text(random.Random(5), 400) + "\n"
    (tmp_path / "t.txt").write_text(text)
    src = tokenize_source(SourceSpec(source=str(tmp_path / "t.txt")), CharTokenizer(), 0, tmp_path / "cache", 0.3,
                          log=lambda *a: None)
    train, held = split_documents([text], 0.3)
    assert train and held
    assert np.asarray(src.train).tolist() == [t for piece in train for t in [ord(c) for c in piece] + [0]]
    assert np.asarray(src.eval).tolist() == [t for piece in held for t in [ord(c) for c in piece] + [0]]


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

    monkeypatch.setattr(tokcache, "encoder", no_encoding)
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


# ---------------------------------------------------------------- unchanged sources are not read again


def mixed_folder(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_docs(root, [make_text(random.Random(i), 40) for i in range(5)])
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": make_text(random.Random(10 + i), 3)}) + "\n"
                                             for i in range(20)))
    pq.write_table(pa.table({"text": [make_text(random.Random(40 + i), 3) for i in range(20)]}), root / "t.parquet")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    age(root)
    return root


def test_a_cached_source_whose_files_did_not_change_is_not_opened(tmp_path, tokenizer, forbid_reading):
    folder = mixed_folder(tmp_path / "docs")
    first = run(tmp_path, tokenizer, folder)
    forbid_reading(folder)
    logged = []
    second = run(tmp_path, tokenizer, folder, log=logged.append)
    assert second.cache_key == first.cache_key and second.content_hash == first.content_hash
    assert np.array_equal(second.train, first.train) and np.array_equal(second.eval, first.eval)
    assert "cached" in logged[-1]
    assert any("image.png" in line and "binary" in line for line in logged)  # warnings still shown
    single = tmp_path / "one" / "single.txt"
    single.parent.mkdir()
    single.write_text(make_text(random.Random(1), 50))
    age(single)
    first_single = run(tmp_path, tokenizer, single)
    forbid_reading(single)
    assert run(tmp_path, tokenizer, single).cache_key == first_single.cache_key


@pytest.mark.parametrize("change", ["same_size_edit", "resize", "add", "remove", "touch"])
def test_a_changed_folder_is_read_again(tmp_path, tokenizer, change):
    folder = mixed_folder(tmp_path / "docs")
    first = run(tmp_path, tokenizer, folder)
    target = folder / "doc002.txt"
    if change == "same_size_edit":
        text = target.read_text()
        target.write_text(text.replace("alpha", "ALPHA") if "alpha" in text else text.upper())
        assert target.stat().st_size == len(text)
    elif change == "resize":
        target.write_text(target.read_text() + "\nmore")
    elif change == "add":
        (folder / "new.txt").write_text("a new document")
    elif change == "remove":
        target.unlink()
    else:
        os.utime(target)  # new mtime, same content: read again, same hash, the cached tokens are reused
    age(folder, 30)  # any later time counts as a change, old or new
    second = run(tmp_path, tokenizer, folder)
    assert (second.content_hash == first.content_hash) == (change == "touch")
    assert (second.cache_key == first.cache_key) == (change == "touch")


def test_a_file_just_written_is_not_indexed_until_it_is_older(tmp_path, tokenizer, monkeypatch):
    import tunelab.data.readers as readers

    path = tmp_path / "fresh.txt"
    path.write_text(make_text(random.Random(2), 30))
    opened = []
    real_open = readers._open
    monkeypatch.setattr(readers, "_open", lambda p: opened.append(p) or real_open(p))
    run(tmp_path, tokenizer, path)
    run(tmp_path, tokenizer, path)
    assert len(opened) == 4  # hash + tokenize, then hash again: mtime too recent to trust
    age(path)
    run(tmp_path, tokenizer, path)
    run(tmp_path, tokenizer, path)
    assert len(opened) == 5  # read once to index it, then not at all


def test_a_new_tokenizer_reads_unchanged_files_once(tmp_path, tokenizer, monkeypatch):
    import tunelab.data.readers as readers

    folder = mixed_folder(tmp_path / "docs")
    run(tmp_path, tokenizer, folder)
    opened = []
    real_open = readers._open
    monkeypatch.setattr(readers, "_open", lambda p: opened.append(Path(p).name) or real_open(p))
    src = run(tmp_path, byte_level_tokenizer("bos"), folder)
    assert sorted(opened) == sorted(p.name for p in folder.iterdir())  # tokenizing, no second pass to hash
    assert src.train[0] == 1  # the new tokenizer's BOS


def test_an_edit_that_keeps_size_and_mtime_is_caught_when_tokenizing(tmp_path, tokenizer):
    from tunelab.errors import DataError

    path = tmp_path / "t.txt"
    path.write_text("version one\n")
    age(path)
    run(tmp_path, tokenizer, path)
    stat = path.stat()
    path.write_text("version two\n")  # same size, and the mtime put back: invisible to the stat index
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="changed while it was being read; run again"):
        run(tmp_path, byte_level_tokenizer("bos"), path)  # a token cache miss reads the file: new hash
    again = run(tmp_path, byte_level_tokenizer("bos"), path)  # the index entry was dropped: read afresh
    assert decode_documents(byte_level_tokenizer("bos"), again.train) == ["<s>version two\n"]


def test_memory_does_not_grow_with_the_source(tmp_path, tokenizer, monkeypatch):
    """Documents are read, split and encoded as a stream: Python's peak allocation while tokenizing is
    about one batch, whatever the size of the source (a list of all documents would grow with it)."""
    import tracemalloc

    monkeypatch.setattr(encode, "BATCH_CHARS", 50_000)
    docs = [make_text(random.Random(i), 1500) for i in range(48)]  # about 65 KB each
    peaks = []
    for n in (8, 48):
        folder = write_docs(tmp_path / f"docs{n}", docs[:n])
        tracemalloc.start()
        run(tmp_path, tokenizer, folder)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    source_bytes = sum(len(d) for d in docs)
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < source_bytes / 3, (peaks, source_bytes)
