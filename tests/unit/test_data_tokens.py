"""What the token cache holds per document: the tokenizer's own special tokens, loss masks, whole
eval-only sources."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from test_data_helpers import byte_level_tokenizer, make_text, write_docs
from tunelab.config import SourceSpec
from tunelab.data import PackedSequences, cache_key, collate, split_documents, tokenize_source, tokenize_sources


def run(tmp_path, tokenizer, source, eos_id=None, eval_fraction=0.2, split=True, **fields):
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    return tokenize_source(SourceSpec(source=str(source), **fields), tokenizer, eos, tmp_path / "cache",
                           eval_fraction, log=lambda *a: None, split=split)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_tokens(tokenizer, pieces, prefix, closing) -> list[int]:
    return [t for piece in pieces for t in prefix + ids(tokenizer, piece) + closing]


def some_docs(n=12, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng, rng.randint(5, 80)) + "\n" for _ in range(n)]


# ---------------------------------------------------------------- the tokenizer's own special tokens


def test_our_byte_level_bpe_adds_only_eos(tmp_path):
    tok = byte_level_tokenizer()
    docs = some_docs()
    src = run(tmp_path, tok, write_docs(tmp_path / "docs", docs))
    train, held = split_documents(docs, 0.2)
    assert np.asarray(src.train).tolist() == expected_tokens(tok, train, [], [tok.eos_token_id])
    assert np.asarray(src.eval).tolist() == expected_tokens(tok, held, [], [tok.eos_token_id])


def test_a_tokenizer_that_adds_bos_gets_bos_before_every_document(tmp_path):
    tok = byte_level_tokenizer("bos")
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the post-processor adds it, as a hub Llama's does
    docs = some_docs()
    src = run(tmp_path, tok, write_docs(tmp_path / "docs", docs))
    train, held = split_documents(docs, 0.2)
    assert train and held
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert np.asarray(src.train).tolist() == expected_tokens(tok, train, [bos], [eos])
    assert np.asarray(src.eval).tolist() == expected_tokens(tok, held, [bos], [eos])


def test_a_bert_like_tokenizer_gets_cls_before_and_sep_after(tmp_path):
    tok = byte_level_tokenizer("bert")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    docs = some_docs()
    src = run(tmp_path, tok, write_docs(tmp_path / "docs", docs), eos_id=sep)
    train, held = split_documents(docs, 0.2)
    assert np.asarray(src.train).tolist() == expected_tokens(tok, train, [cls], [sep])  # no extra EOS after SEP
    assert np.asarray(src.eval).tolist() == expected_tokens(tok, held, [cls], [sep])


def test_a_suffix_that_is_not_the_eos_is_followed_by_it():
    from tunelab.tokenizers import closing_tokens

    assert closing_tokens([], 7) == [7]
    assert closing_tokens([3], 3) == [3]
    assert closing_tokens([3], 7) == [3, 7]  # packing finds document ends by the EOS id


class CharTokenizer:
    """A slow (non-fast) tokenizer, one id per character, optionally adding a BOS (id 1)."""

    is_fast = False

    def __init__(self, bos: bool):
        self.bos = bos

    def __len__(self):
        return 300

    def get_vocab(self):
        return {chr(i): i for i in range(2, 300)}

    def __call__(self, texts, add_special_tokens=False):
        bos = [1] if add_special_tokens and self.bos else []
        return {"input_ids": [bos + [ord(c) for c in t] for t in texts]}


def test_prefix_and_suffix_are_part_of_the_cache_key(tmp_path):
    # Same vocabulary (so the same fingerprint for a slow tokenizer), different special tokens.
    assert cache_key("h", CharTokenizer(bos=False), 0, 0.1) != cache_key("h", CharTokenizer(bos=True), 0, 0.1)
    (tmp_path / "t.txt").write_text("abc\ndef\n")
    src = tokenize_source(SourceSpec(source=str(tmp_path / "t.txt")), CharTokenizer(bos=True), 0, tmp_path / "c",
                          0.3, log=lambda *a: None)
    assert np.asarray(src.train).tolist() == [1] + [ord(c) for c in "abc\ndef\n"] + [0]


# ---------------------------------------------------------------- loss masks


def segmented_rows():
    return [
        {"text": "a plain document, all of it a target\n"},
        {"text": [{"text": "Question: what is packing?\n", "loss": False},
                  {"text": "Answer: documents joined by EOS.\n", "loss": True}]},
        {"text": [{"text": "System: be brief.\n", "loss": False}, {"text": "User: hi\n", "loss": False},
                  {"text": "Assistant: hello\n"}]},  # "loss" left out: true
        {"text": [{"text": "Only context, ", "loss": True}, {"text": "ending masked\n", "loss": False}]},
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected_with_mask(tok, rows, prefix, eos):
    """Token by token: each segment tokenized alone; prefix mask 0, closing mask = the last segment's."""
    tokens, mask = [], []
    for row in rows:
        segments = [(row["text"], True)] if isinstance(row["text"], str) else \
            [(s["text"], s.get("loss", True)) for s in row["text"]]
        tokens += prefix
        mask += [0] * len(prefix)
        for text, loss in segments:
            seg_ids = ids(tok, text)
            tokens += seg_ids
            mask += [int(loss)] * len(seg_ids)
        tokens.append(eos)
        mask.append(int(segments[-1][1]))
    return tokens, mask


@pytest.mark.parametrize("post", [None, "bos"])
def test_masked_segments_have_mask_0_token_by_token(tmp_path, post):
    tok = byte_level_tokenizer(post)
    rows = segmented_rows()
    src = run(tmp_path, tok, write_jsonl(tmp_path / "chat.jsonl", rows), split=False)
    prefix = [tok.bos_token_id] if post == "bos" else []
    tokens, mask = expected_with_mask(tok, rows, prefix, tok.eos_token_id)
    assert np.asarray(src.eval).tolist() == tokens
    assert src.eval_mask.dtype == np.uint8 and np.asarray(src.eval_mask).tolist() == mask
    assert len(src.train) == 0 and src.train_mask is not None and len(src.train_mask) == 0
    entry = tmp_path / "cache" / "tokens" / src.cache_key
    assert {"train.mask.bin", "eval.mask.bin"} <= {p.name for p in entry.iterdir()}
    assert json.loads((entry / "meta.json").read_text())["masked"] is True


def test_masks_stay_aligned_with_train_and_eval(tmp_path):
    tok = byte_level_tokenizer()
    rng = random.Random(1)
    rows = []
    for i in range(60):  # short documents: each one unit, so each lands whole on one side
        if i % 3:
            rows.append({"text": [{"text": f"prompt {i}: " + make_text(rng, 2) + "\n", "loss": False},
                                  {"text": make_text(rng, 2) + "\n", "loss": bool(i % 2)}]})
        else:
            rows.append({"text": make_text(rng, 3) + "\n"})
    src = run(tmp_path, tok, write_jsonl(tmp_path / "mixed.jsonl", rows), eval_fraction=0.3)
    by_tokens = {}
    for row in rows:
        tokens, mask = expected_with_mask(tok, [row], [], tok.eos_token_id)
        by_tokens[tuple(tokens)] = mask
    seen = 0
    for tokens, mask in ((src.train, src.train_mask), (src.eval, src.eval_mask)):
        assert len(mask) == len(tokens) and len(tokens) > 0
        tokens, mask = np.asarray(tokens).tolist(), np.asarray(mask).tolist()
        start = 0
        for end in [i + 1 for i, t in enumerate(tokens) if t == tok.eos_token_id]:
            assert mask[start:end] == by_tokens[tuple(tokens[start:end])]
            start, seen = end, seen + 1
    assert seen == len(rows) == src.train_docs + src.eval_docs


def test_a_source_without_masked_segments_stores_no_mask(tmp_path):
    tok = byte_level_tokenizer()
    plain = run(tmp_path, tok, write_docs(tmp_path / "docs", some_docs()))
    assert plain.train_mask is None and plain.eval_mask is None
    all_trained = write_jsonl(tmp_path / "all.jsonl",
                              [{"text": [{"text": "Q: x\n"}, {"text": "A: y\n", "loss": True}]}])
    src = run(tmp_path, tok, all_trained, split=False)
    assert src.eval_mask is None
    assert np.asarray(src.eval).tolist() == ids(tok, "Q: x\n") + ids(tok, "A: y\n") + [tok.eos_token_id]
    for entry in (tmp_path / "cache" / "tokens").iterdir():
        assert not [p for p in entry.iterdir() if "mask" in p.name]


def test_packed_windows_carry_the_loss_mask(tmp_path):
    tok = byte_level_tokenizer()
    src = run(tmp_path, tok, write_jsonl(tmp_path / "chat.jsonl", segmented_rows()), split=False)
    packed = PackedSequences(src.eval, 8, tok.eos_token_id, document_mask=True, loss_mask=src.eval_mask)
    batch = collate([packed[0], packed[1]])
    assert set(batch) == {"input_ids", "position_ids", "loss_mask"}
    assert batch["loss_mask"].tolist() == np.asarray(src.eval_mask[:16]).reshape(2, 8).tolist()


# ---------------------------------------------------------------- eval-only sources scored whole


def test_split_false_puts_every_document_in_eval_under_its_own_key(tmp_path):
    tok = byte_level_tokenizer()
    docs = some_docs(8) + [make_text(random.Random(2), 400) + "\n"]  # a long one is not cut either
    folder = write_docs(tmp_path / "docs", docs)
    whole = run(tmp_path, tok, folder, split=False)
    assert len(whole.train) == 0 and whole.train_docs == 0 and whole.eval_docs == len(docs)
    assert np.asarray(whole.eval).tolist() == expected_tokens(tok, docs, [], [tok.eos_token_id])
    assert whole.eval_bytes == sum(len(d.encode()) for d in docs)
    split = run(tmp_path, tok, folder, split=True)
    assert split.cache_key != whole.cache_key and len(split.train) > 0
    assert run(tmp_path, tok, folder, split=False, eval_fraction=0.1).cache_key == whole.cache_key
    (listed,) = tokenize_sources([SourceSpec(source=str(folder))], tok, tok.eos_token_id, tmp_path / "cache", 0.2,
                                 log=lambda *a: None, split=False)
    assert listed.cache_key == whole.cache_key
