"""`train.precision: auto` and the bf16 warning; pad id 0 is a real pad id."""

from __future__ import annotations

import pytest
import torch

from tunelab.train import precision


@pytest.fixture
def cpu(monkeypatch):
    def set_(has_flags: bool, slowdown: float):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: has_flags)
        monkeypatch.setattr(precision, "bf16_slowdown", lambda device_type: slowdown)
    return set_


def test_auto_picks_bf16_only_on_fast_hardware(cpu):
    cpu(True, 0.5)
    assert precision.resolve_precision("auto", torch.device("cpu"), log=lambda *a: None)[0] == "bf16"
    cpu(False, 40.0)  # an AVX2-only EPYC: bf16 matmuls ~40x slower than fp32
    used, why = precision.resolve_precision("auto", torch.device("cpu"), log=lambda *a: None)
    assert used == "fp32" and "without" in why
    cpu(True, 3.0)  # the flags claim support, but the probe says otherwise (a VM hiding the units)
    assert precision.resolve_precision("auto", torch.device("cpu"), log=lambda *a: None)[0] == "fp32"


def test_explicit_bf16_on_slow_hardware_trains_as_asked_but_warns(cpu):
    cpu(False, 40.0)
    messages = []
    used, _ = precision.resolve_precision("bf16", torch.device("cpu"), log=messages.append)
    assert used == "bf16"
    assert len(messages) == 1 and "warning" in messages[0] and "40.0x" in messages[0]
    messages.clear()
    assert precision.resolve_precision("fp32", torch.device("cpu"), log=messages.append)[0] == "fp32"
    assert messages == []


def test_the_probe_measures_something():
    ratio = precision.bf16_slowdown("cpu")
    assert 0 < ratio < 1e4


def test_generate_passes_pad_id_zero(tmp_path, monkeypatch):
    """`pad_token_id or eos` would turn a real pad id 0 into the EOS id."""
    import random

    from tunelab import evaluate, models, tokenizers

    rng = random.Random(0)
    texts = [" ".join(rng.choice("alpha beta gamma delta".split()) for _ in range(40)) for _ in range(20)]
    tok = tokenizers.train_tokenizer(texts, vocab_size=300)
    assert tok.convert_tokens_to_ids(tokenizers.SPECIAL_TOKENS["eos_token"]) == 0  # specials come first
    tok.pad_token = tokenizers.SPECIAL_TOKENS["eos_token"]  # pad id 0 ...
    tok.eos_token = tokenizers.SPECIAL_TOKENS["mask_token"]  # ... and a different EOS, which `or` would pick
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    torch.manual_seed(0)
    model = models.build_model("llama-micro", tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen["pad"] = kwargs.get("pad_token_id")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    evaluate.generate_text(str(tmp_path / "m"), "alpha", max_new_tokens=3, greedy=True)
    assert seen["pad"] == 0
