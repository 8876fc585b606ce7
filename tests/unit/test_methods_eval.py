"""Methods pick the right parameters; MLM masking rates; held-out loss and bits per byte by hand."""

import math
import random

import numpy as np
import pytest
import torch

from tunelab import models
from tunelab.errors import ConfigError
from tunelab.eval.perplexity import evaluate_tokens, token_byte_lengths
from tunelab.methods import METHODS, create_method
from tunelab.train.objectives import add_labels
from tunelab.train.optim import param_groups


@pytest.fixture(scope="module")
def tokenizer():
    words = "alpha beta gamma delta epsilon zeta café naïve 東京 theta".split()
    rng = random.Random(0)
    return models.train_tokenizer([" ".join(rng.choice(words) for _ in range(300)) for _ in range(30)], 320)


def test_bitfit_trains_exactly_biases_and_norms(tokenizer):
    for preset in ("llama-micro", "bert-tiny"):
        model = create_method("bitfit", {}).prepare(models.build_model(preset, tokenizer))
        expected_ids = set()
        for module in model.modules():
            for p_name, param in module.named_parameters(recurse=False):
                norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
                if p_name == "bias" or (norm and p_name == "weight"):
                    expected_ids.add(id(param))  # by identity: tied parameters have several names
        expected = {n for n, p in model.named_parameters() if id(p) in expected_ids}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected and trainable, preset


def test_bitfit_without_norms_on_a_bias_free_model_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="bitfit"):
        create_method("bitfit", {"include_norms": False}).prepare(models.build_model("llama-micro", tokenizer))


def test_full_trains_everything_and_decay_skips_vectors(tokenizer):
    model = METHODS["full"]().prepare(models.build_model("llama-micro", tokenizer))
    named = METHODS["full"]().trainable_params(model)
    assert len(named) == len(list(model.parameters()))
    decay, no_decay = param_groups(named, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_mlm_masking_rates_and_determinism():
    ids = torch.randint(5, 1000, (64, 256))
    ids[:, 0] = 1  # a special token that must never be chosen
    batch = {"input_ids": ids}
    out = add_labels(batch, "mlm", mask_id=2, vocab_size=1000, special_ids=[1], generator=torch.Generator().manual_seed(3))
    chosen = out["labels"] != -100
    n, p = ids.numel() - 64, 0.15
    assert abs(int(chosen.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert not chosen[:, 0].any()
    masked = (out["input_ids"] == 2) & chosen
    kept = (out["input_ids"] == ids) & chosen
    assert int(masked.sum()) / int(chosen.sum()) == pytest.approx(0.8, abs=0.02)
    assert int(kept.sum()) / int(chosen.sum()) == pytest.approx(0.1, abs=0.02)  # incl. random draws equal by chance
    again = add_labels(batch, "mlm", mask_id=2, vocab_size=1000, special_ids=[1], generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["input_ids"], out["input_ids"])
    clm = add_labels(batch, "clm")
    assert torch.equal(clm["labels"], ids)


def test_token_byte_lengths_add_up_to_utf8_bytes(tokenizer):
    text = "alpha café 東京 naïve gamma"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert int(token_byte_lengths(tokenizer)[ids].sum()) == len(text.encode("utf-8"))


def test_evaluate_tokens_matches_a_hand_computation(tokenizer):
    torch.manual_seed(0)
    model = models.build_model("llama-micro", tokenizer).eval()
    text = " ".join(["alpha beta café gamma 東京"] * 40)
    tokens = np.array(tokenizer(text)["input_ids"], dtype=np.uint16)
    seq = 16
    result = evaluate_tokens(model, tokens, seq, eos_id=0, document_mask=False,
                             byte_lengths=token_byte_lengths(tokenizer), batch_size=3)
    nats, count, nbytes = 0.0, 0, 0
    lengths = token_byte_lengths(tokenizer)
    for i in range(len(tokens) // seq):  # every full window, one at a time
        window = torch.tensor(tokens[i * seq:(i + 1) * seq].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), -1)
        target = window[0, 1:]
        nats -= float(logp[torch.arange(seq - 1), target].sum())
        count += seq - 1
        nbytes += int(lengths[target.numpy()].sum())
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
