"""The tokenizer module: cached training, fingerprints, vocabulary expansion that keeps every existing id and
every old encoding, and the chat template a run renders with, saved by every run (a DPO run included)."""

from __future__ import annotations

import json
import random

import pytest

from test_data_helpers import WORDS, byte_level_tokenizer, make_text
from tunelab import tokenizers
from tunelab.config import SourceSpec
from tunelab.data import tokenize_source
from tunelab.errors import ModelError


def texts(seed: int, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng, 5) for _ in range(n)]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- train, cache, fingerprint


def test_a_cached_tokenizer_is_trained_once_and_keeps_its_fingerprint(tmp_path):
    lines = []
    first = tokenizers.cached_tokenizer(tmp_path / "key", lambda: texts(0), 300, 2, log=lines.append)
    assert len(lines) == 1 and "vocab 300" in lines[0] and len(first) == 300

    def never():
        raise AssertionError("a cached tokenizer must not read its training texts again")

    again = tokenizers.cached_tokenizer(tmp_path / "key", never, 300, 2, log=lines.append)
    assert len(lines) == 1
    assert tokenizers.tokenizer_fingerprint(again) == tokenizers.tokenizer_fingerprint(first)
    assert tokenizers.tokenizer_fingerprint(tokenizers.train_tokenizer(texts(1), 300)) != \
        tokenizers.tokenizer_fingerprint(first)
    # Truncation left on by a caller changes nothing the tokenizer maps text to: the same fingerprint.
    again.backend_tokenizer.enable_truncation(8)
    assert tokenizers.tokenizer_fingerprint(again) == tokenizers.tokenizer_fingerprint(first)


# ---------------------------------------------------------------- vocabulary expansion


NEW = [" alphabeta", " tokencache", " tokencacheeval", " mixturepackingwindow"]  # two share a chain of merges


def test_added_tokens_keep_every_id_and_every_old_encoding(tmp_path):
    from transformers import AutoTokenizer

    old = byte_level_tokenizer()
    vocab = old.get_vocab()
    grown, new = tokenizers.add_tokens(old, NEW)
    assert set(new) == set(NEW) and len(set(new.values())) == len(NEW)
    assert min(new.values()) >= len(old) and len(grown) > len(old)
    grown_vocab = grown.get_vocab()
    assert all(grown_vocab[token] == i for token, i in vocab.items())  # every existing token keeps its id
    for token, i in new.items():
        assert ids(grown, token) == [i] and grown.decode([i]) == token
    added = set(grown_vocab.values()) - set(vocab.values())
    rng = random.Random(3)
    corpus = texts(2) + ["".join(rng.choice(WORDS + [" ", "\n", "    ", "é", "✓"]) for _ in range(60))
                         for _ in range(200)]
    untouched = used = 0
    for text in corpus:
        before, after = ids(old, text), ids(grown, text)
        assert grown.decode(after) == text
        if added.isdisjoint(after):  # an encoding with old tokens only is exactly the old one
            assert after == before, text
            untouched += 1
        else:
            used += 1
    assert untouched > 50 and used > 5  # both kinds of text were seen
    # A text without the new tokens' spellings never changes.
    plain = "gamma delta eval train split\nwindow domain"
    assert ids(grown, plain) == ids(old, plain)
    # Saved and read back by plain transformers: the same ids.
    grown.save_pretrained(tmp_path / "grown")
    reread = AutoTokenizer.from_pretrained(tmp_path / "grown")
    assert all(reread.get_vocab()[t] == i for t, i in grown_vocab.items())
    assert [ids(reread, t) for t in corpus[:20]] == [ids(grown, t) for t in corpus[:20]]


def test_adding_tokens_refuses_what_cannot_be_one_new_token():
    tok = byte_level_tokenizer()
    existing = tok.convert_ids_to_tokens(ids(tok, " alpha"))
    assert len(existing) == 1
    with pytest.raises(ModelError, match="already a token"):
        tokenizers.add_tokens(tok, [" alpha"])
    with pytest.raises(ModelError, match="pre-tokenizer splits it"):
        tokenizers.add_tokens(tok, ["alpha beta"])  # a space starts a new pre-token: never one token
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # "abc" is a token, but "abc" encodes as [a, bc] (merge b+c ranks first, and no merge makes a+bc): a new merge
    # a+bc would make the old token where old texts had two, so it is refused.
    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5}, [("b", "c"), ("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="'abc' is already a token that this text does not encode to"):
        tokenizers.add_tokens(PreTrainedTokenizerFast(tokenizer_object=bpe), ["abc"])
    with pytest.raises(ModelError, match="is empty"):
        tokenizers.add_tokens(tok, [""])
    wordlevel = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="needs a BPE tokenizer"):
        tokenizers.add_tokens(PreTrainedTokenizerFast(tokenizer_object=wordlevel), ["a b"])


# ---------------------------------------------------------------- chat template


def test_the_template_a_tokenizer_renders_with_becomes_its_own(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_level_tokenizer()
    assert tokenizers.adopt_chat_template(tok) == (tokenizers.BUILTIN_TEMPLATE, True)
    assert tokenizers.adopt_chat_template(tok) == (tokenizers.BUILTIN_TEMPLATE, False)
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.chat_template = {"default": own, "tool_use": "x"}
    assert tokenizers.adopt_chat_template(tok) == (own, False) and tok.chat_template["tool_use"] == "x"
    # Rendering preference pairs (as a DPO run's data does) leaves the template on the tokenizer, so any save
    # of it (a full final/, an adapter's, a checkpoint) carries it.
    fresh = byte_level_tokenizer()
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "alpha", "chosen": "beta", "rejected": "no gamma"}) + "\n")
    lines = []
    tokenize_source(SourceSpec(source=str(source), format="preference"), fresh, fresh.eos_token_id,
                    tmp_path / "cache", 0.3, log=lines.append, split=False)
    assert any("no chat template: using the built-in one" in line for line in lines)
    fresh.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == tokenizers.BUILTIN_TEMPLATE


@pytest.mark.slow
def test_a_dpo_run_saves_the_template_it_trained_with(tmp_path):
    from test_preference import base_and_pairs, dpo_recipe
    from transformers import AutoTokenizer

    from tunelab.recipe import load_recipe
    from tunelab.data.chat import pair_from_row
    from tunelab.data.tokcache import _load_entry
    from tunelab.paths import resolve_cache_dir
    from tunelab.stages import run_stage

    base, pairs = base_and_pairs(tmp_path)
    assert not AutoTokenizer.from_pretrained(base).chat_template  # a model without a chat template
    recipe = dpo_recipe(tmp_path, base, pairs, max_steps=2, eval_every=2, checkpoint_every=2)
    run = run_stage(load_recipe(recipe), out=tmp_path / "dpo", quiet=True)
    plain = AutoTokenizer.from_pretrained(run / "final")  # what any other reader sees
    assert plain.chat_template == tokenizers.BUILTIN_TEMPLATE
    # The documents the run trained on, from its token cache entry, are exactly what the saved template renders.
    entry = json.loads((run / "lineage.json").read_text())["data"][0]
    arrays, _ = _load_entry(resolve_cache_dir() / "tokens" / entry["cache_key"])
    tokens, starts = arrays["train"].tolist(), arrays["train_starts"].tolist() + [len(arrays["train"])]
    decode = plain.backend_tokenizer.decode
    trained = [decode(tokens[a:b], skip_special_tokens=False) for a, b in zip(starts, starts[1:])]
    rendered = {plain.apply_chat_template([{"role": r, "content": c} for r, c in conversation], tokenize=False)
                for line in pairs.read_text().splitlines()
                for conversation in pair_from_row(json.loads(line), "pairs").conversations()}
    assert len(trained) > 50 and set(trained) <= rendered
