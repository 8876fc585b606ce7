"""Model presets, tokenizers, HF round trips, pairing checks, and byte/window helpers of eval."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tunelab.errors import ModelError
from tunelab.eval.perplexity import token_byte_lengths, window_indices
from tunelab.models import PRESETS, build_model, check_pair, count_params, enable_gradient_checkpointing, load_model
from tunelab.tokenizers import SPECIAL_TOKENS, eos_id, train_tokenizer

_WORDS = ("the model data token train loss step layer weight value cache file text domain batch "
          "café naïve über straße données 日本語 ✓ résumé").split()
SAMPLE = "Héllo wörld — naïve café, 日本語 text ✓ with ASCII too: def f(x): return x * 2\n\ttabs & ünïcödé 🙂"


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]
    return train_tokenizer(texts, vocab_size=300)


class StubTokenizer:
    """What build_model needs from a tokenizer: a length and special ids (to size big presets cheaply)."""

    pad_token_id = 1
    eos_token_id = 0

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


def llama_params(vocab, h, inter, layers, tied=True):
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q,k,v,o (no bias; kv heads = heads) + gate/up/down + 2 RMSNorms
    return vocab * h * (1 if tied else 2) + layers * per_layer + h  # + final norm


def bert_mlm_params(vocab, h, inter, layers, positions=512, types=2):
    emb = (vocab + positions + types) * h + 2 * h
    per_layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
    head = (h * h + h) + 2 * h + vocab  # transform dense + LayerNorm + decoder bias (decoder weight tied)
    return emb + layers * per_layer + head


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset,vocab,expected,lo,hi", [
    ("llama-micro", 4096, llama_params(4096, 32, 64, 2), 0.1e6, 0.3e6),
    ("llama-tiny", 4096, llama_params(4096, 128, 352, 2), 0.5e6, 1.5e6),
    ("llama-small", 8192, llama_params(8192, 512, 1024, 6), 15e6, 25e6),
    ("bert-tiny", 4096, bert_mlm_params(4096, 128, 512, 2), 0.5e6, 1.5e6),
])
def test_preset_parameter_counts(preset, vocab, expected, lo, hi):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model(preset, StubTokenizer(vocab))
    assert model.config.vocab_size == vocab
    n = count_params(model)
    assert n == expected
    assert lo <= n <= hi


def test_llama_presets_tie_embeddings(tokenizer):
    model = build_model("llama-micro", tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_count_params_trainable_only(tokenizer):
    model = build_model("llama-micro", tokenizer)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - 300 * 32


def test_unknown_preset_has_hint(tokenizer):
    with pytest.raises(ModelError) as err:
        build_model("llama-tiyn", tokenizer)
    assert "did you mean 'llama-tiny'" in str(err.value)
    assert set(PRESETS) >= {"llama-micro", "llama-tiny", "llama-small", "bert-tiny"}


def test_preset_overrides_apply(tokenizer):
    model = build_model("llama-micro", tokenizer, overrides={"num_hidden_layers": 1, "max_position_embeddings": 64})
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.config.max_position_embeddings == 64
    assert PRESETS["llama-micro"][1]["num_hidden_layers"] == 2  # the preset itself is not mutated


@pytest.mark.parametrize("overrides", [{"hidden_size": 33}, {"rms_norm_eps": "1e-5"}, {"num_attention_heads": 0}])
def test_bad_model_overrides_are_a_one_line_model_error(tokenizer, overrides):
    # transformers 5 configs are strict dataclasses with their own exception types: still a ModelError.
    with pytest.raises(ModelError) as err:
        build_model("llama-micro", tokenizer, overrides=overrides)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.overrides")


@pytest.mark.parametrize("overrides,words", [({"hidden_size": 33}, ["33", "attention heads"]),
                                             ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "float"])])
def test_bad_model_overrides_error_says_why(tokenizer, overrides, words):
    with pytest.raises(ModelError) as err:
        build_model("llama-micro", tokenizer, overrides=overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("preset,typo,hint", [("llama-micro", "num_hiden_layers", "num_hidden_layers"),
                                              ("bert-tiny", "hidden_dropout", "hidden_dropout_prob")])
def test_misspelt_model_override_is_an_error_with_hint(tokenizer, preset, typo, hint):
    with pytest.raises(ModelError) as err:
        build_model(preset, tokenizer, overrides={typo: 1})
    msg = str(err.value)
    assert f"model.overrides.{typo}" in msg and f"did you mean '{hint}'" in msg


# ---------------------------------------------------------------- check_pair, eos_id


def test_check_pair_accepts_a_matching_pair(tokenizer):
    model = build_model("llama-micro", tokenizer)
    check_pair(model, tokenizer, seq_len=2048)  # exactly the position limit is fine


def test_check_pair_tokenizer_bigger_than_embedding(tokenizer):
    model = build_model("llama-micro", tokenizer)
    bigger = train_tokenizer([" ".join(_WORDS) * 20] * 40, vocab_size=300)
    bigger.add_tokens(["<extra_a>", "<extra_b>"])
    assert len(bigger) == 302
    with pytest.raises(ModelError) as err:
        check_pair(model, bigger, seq_len=64)
    msg = str(err.value)
    assert "302" in msg and "300" in msg and "\n" not in msg


def test_check_pair_smaller_tokenizer_is_fine(tokenizer):
    model = build_model("llama-micro", StubTokenizer(400))
    check_pair(model, tokenizer, seq_len=64)  # unused embedding rows are harmless


@pytest.mark.parametrize("preset,limit", [("llama-micro", 2048), ("bert-tiny", 512)])
def test_check_pair_seq_len_beyond_positions(tokenizer, preset, limit):
    model = build_model(preset, tokenizer)
    check_pair(model, tokenizer, seq_len=limit)
    with pytest.raises(ModelError) as err:
        check_pair(model, tokenizer, seq_len=limit + 1)
    msg = str(err.value)
    assert f"data.seq_len={limit + 1}" in msg and str(limit) in msg


def test_eos_id(tokenizer):
    assert eos_id(tokenizer) == tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["eos_token"])

    class SepOnly:
        eos_token_id = None
        sep_token_id = 7

    class Neither:
        eos_token_id = None
        sep_token_id = None

    assert eos_id(SepOnly()) == 7
    with pytest.raises(ModelError):
        eos_id(Neither())


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_round_trip(tokenizer):
    assert len(tokenizer) == 300
    for attr, text in SPECIAL_TOKENS.items():
        assert getattr(tokenizer, attr) == text
    # Byte-level: any text round-trips, nothing is unknown.
    ids = tokenizer.encode(SAMPLE)
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_tokenizer_training_is_deterministic():
    texts = [" ".join(_WORDS)] * 30
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    assert a.encode(SAMPLE) == b.encode(SAMPLE)


def test_tokenizer_reloads_with_plain_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert len(plain) == len(tokenizer)
    assert plain.get_vocab() == tokenizer.get_vocab()
    for text in (SAMPLE, "", " leading space", "<|endoftext|>joined<|pad|>"):
        assert plain.encode(text) == tokenizer.encode(text), text
        assert plain.decode(plain.encode(text)) == text
    assert (plain.eos_token, plain.pad_token, plain.mask_token) == (
        tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token)
    assert plain.all_special_ids == tokenizer.all_special_ids


# ---------------------------------------------------------------- models round trip through plain transformers


def test_causal_model_reloads_with_plain_transformers(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model("llama-micro", tokenizer).eval()
    with torch.no_grad():  # move the weights off their init so a silent re-init would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(str(tmp_path)).eval()
    ids = torch.tensor([tokenizer.encode(SAMPLE)[:48]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, expected)
        assert torch.equal(ours(input_ids=ids).logits, expected)


def test_mlm_model_reloads_with_plain_transformers(tokenizer, tmp_path):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    model = build_model("bert-tiny", tokenizer).eval()
    model.save_pretrained(tmp_path)
    plain = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ours = load_model(str(tmp_path)).eval()
    ids = torch.tensor([tokenizer.encode(SAMPLE)[:48]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, expected)
        assert torch.equal(ours(input_ids=ids).logits, expected)


def test_load_model_missing_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "nope"))


# ---------------------------------------------------------------- token_byte_lengths


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, written out independently of `tokenizers`."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_token_byte_lengths_per_token(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (len(tokenizer),)
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    n_checked_decode = 0
    for tok, i in tokenizer.get_vocab().items():
        if i in special:
            assert lengths[i] == 0
            continue
        raw = bytes(char_to_byte[c] for c in tok)
        assert lengths[i] == len(raw), (tok, i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: no text of its own
        # Whole characters: the byte count is the UTF-8 length of the decoded token.
        assert lengths[i] == len(tokenizer.decode([i]).encode("utf-8")) == len(text.encode("utf-8"))
        n_checked_decode += 1
    assert n_checked_decode > 128  # at least the ASCII bytes plus some merges
    # The vocabulary covers multi-byte characters (é is 2 bytes, 日 is 3).
    assert lengths.max() >= 3


@pytest.mark.parametrize("text", [SAMPLE, "plain ascii only", "日本語", "ünïcödé 🙂🙂", "a\nb\r\n\tc  d"])
def test_token_byte_lengths_sum_to_utf8_length(tokenizer, text):
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(text)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_token_byte_lengths_specials_are_zero(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode("<|endoftext|>café<|pad|>")
    assert int(lengths[ids].sum()) == len("café".encode("utf-8"))


def test_token_byte_lengths_added_token_with_latin1(tokenizer):
    # Added tokens are stored as plain text, not byte-level symbols, yet 'é' is also a byte-level
    # symbol (byte 0xE9): counting one byte per character would say 5; decoding through the
    # ByteLevel decoder would give 'caf\ufffd!' (7). The text is 6 UTF-8 bytes.
    tok = train_tokenizer([" ".join(_WORDS)] * 30, vocab_size=300)
    tok.add_tokens(["café!"])
    lengths = token_byte_lengths(tok)
    ids = tok.encode("café!")
    assert ids == [len(tok) - 1]
    assert int(lengths[ids].sum()) == len("café!".encode("utf-8"))  # 6, not 5


# ---------------------------------------------------------------- window_indices


def test_window_indices_all_when_under_budget():
    assert window_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert window_indices(3, 10).tolist() == [0, 1, 2]
    assert window_indices(0, 4).tolist() == []


def test_window_indices_spread_evenly():
    assert window_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert window_indices(101, 5).tolist() == [0, 25, 50, 75, 100]
    for n, k in [(1000, 7), (17, 16), (50, 2), (9, 1)]:
        picked = window_indices(n, k)
        assert len(picked) == k
        assert picked[0] == 0 and (k == 1 or picked[-1] == n - 1)
        assert np.all(np.diff(picked) > 0) and picked.max() < n
        if k > 1:  # gaps differ by at most one (even spread)
            gaps = np.diff(picked)
            assert gaps.max() - gaps.min() <= 1


# ---------------------------------------------------------------- evaluate_tokens (needs tunelab.data)


def test_evaluate_tokens_matches_a_manual_computation(tokenizer):
    pytest.importorskip("tunelab.data")
    from tunelab.eval.perplexity import evaluate_tokens

    torch.manual_seed(0)
    model = build_model("llama-micro", tokenizer)
    model.train()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, len(tokenizer), size=10 * 16 + 5).astype(np.int64)  # 10 windows + a dropped tail
    lengths = token_byte_lengths(tokenizer)
    eos = eos_id(tokenizer)
    out = evaluate_tokens(model, tokens, 16, eos_id=eos, document_mask=False, byte_lengths=lengths,
                          max_tokens=4 * 16, batch_size=3)
    assert model.training  # mode restored

    picked = [0, 3, 6, 9]  # 4 windows spread over 10
    model.eval()
    nats, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for w in picked:
            ids = torch.from_numpy(tokens[w * 16:(w + 1) * 16]).unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1].double()
            target = ids[0, 1:]
            nats += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += len(target)
            nbytes += int(lengths[target.numpy()].sum())
    assert out["eval_tokens"] == n == 4 * 15 and "tokens" not in out
    assert out["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert out["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)


def test_evaluate_tokens_with_a_loss_mask_scores_only_masked_in_targets(tokenizer):
    from tunelab.eval.perplexity import evaluate_tokens

    torch.manual_seed(0)
    model = build_model("llama-micro", tokenizer).eval()
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, len(tokenizer), size=6 * 16).astype(np.int64)
    loss_mask = (rng.random(len(tokens)) < 0.5).astype(np.uint8)
    lengths = token_byte_lengths(tokenizer)
    out = evaluate_tokens(model, tokens, 16, eos_id=eos_id(tokenizer), document_mask=False, byte_lengths=lengths,
                          batch_size=4, loss_mask=loss_mask)
    nats, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for w in range(6):
            ids = torch.from_numpy(tokens[w * 16:(w + 1) * 16]).unsqueeze(0)
            keep = torch.from_numpy(loss_mask[w * 16:(w + 1) * 16][1:]).bool()  # label t is token t of the window
            logits = model(input_ids=ids).logits[0, :-1].double()[keep]
            target = ids[0, 1:][keep]
            nats += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += len(target)
            nbytes += int(lengths[target.numpy()].sum())
    assert out["eval_tokens"] == n == int(sum(loss_mask[w * 16 + 1:(w + 1) * 16].sum() for w in range(6)))
    assert out["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert out["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)


def test_objective_must_fit_the_architecture(tokenizer):
    from tunelab.models import build_model, check_objective

    bert, llama = build_model("bert-tiny", tokenizer), build_model("llama-micro", tokenizer)
    from tunelab.objectives import objective_class

    check_objective(bert, objective_class("mlm"))
    check_objective(llama, objective_class("clm"))
    with pytest.raises(ModelError, match="bert is a masked-LM encoder: set objective.name: mlm"):
        check_objective(bert, objective_class("dpo"))
    with pytest.raises(ModelError, match="llama is a causal decoder: set objective.name: clm"):
        check_objective(llama, objective_class("mlm"))


def test_gradient_checkpointing_on_a_model_without_it_is_a_one_line_error():
    with pytest.raises(ModelError, match="train.gradient_checkpointing: false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_leaves_the_saved_config_alone(tokenizer, tmp_path):
    model = build_model("llama-micro", tokenizer)
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    model.save_pretrained(tmp_path)
    assert "checkpointing" not in (tmp_path / "config.json").read_text()
