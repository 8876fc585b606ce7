"""`train.precision: auto` decided by the hardware, and the bf16 warning; pad id 0 is a real pad id."""

from __future__ import annotations

import pytest
import torch

from tunelab.train import precision


def _cpu(monkeypatch, flags: set[str], capability: str = "AVX512"):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


def _no_timing(monkeypatch):
    """The decision must not time anything: a clock that moves would be a probe."""
    import time

    def refuse(*a):
        raise AssertionError("precision decided by a timing")
    monkeypatch.setattr(time, "perf_counter", refuse)
    monkeypatch.setattr(torch, "matmul", refuse)


@pytest.mark.parametrize("flags, capability, expected", [
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "AVX512", "bf16"),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16"),  # Cooper Lake, Zen 4
    ({"avx2", "fma"}, "AVX2", "fp32"),  # an AVX2-only EPYC: bf16 matmuls ~40x slower than fp32
    (set(), "DEFAULT", "fp32"),  # no /proc/cpuinfo
])
def test_auto_is_decided_by_the_cpu_flags(monkeypatch, flags, capability, expected):
    _cpu(monkeypatch, flags, capability)
    _no_timing(monkeypatch)
    used, why = precision.resolve_precision("auto", torch.device("cpu"), log=pytest.fail)
    assert used == expected
    assert why.startswith(f"auto: CPU {capability} ") and ("without" in why) == (expected == "fp32")


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_is_decided_by_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _no_timing(monkeypatch)
    used, why = precision.resolve_precision("auto", torch.device("cuda", 0), log=pytest.fail)
    assert used == expected and f"capability {capability[0]}.{capability[1]}" in why


def test_the_same_machine_decides_the_same_way_every_time(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16"})
    decisions = {precision.resolve_precision("auto", torch.device("cpu"), log=pytest.fail) for _ in range(5)}
    assert decisions == {("bf16", "auto: CPU AVX512 with avx512_bf16")}


def test_explicit_bf16_on_a_cpu_without_it_trains_as_asked_but_warns(monkeypatch):
    _cpu(monkeypatch, {"avx2"}, "AVX2")
    messages = []
    used, why = precision.resolve_precision("bf16", torch.device("cpu"), log=messages.append)
    assert used == "bf16" and why == "set in the recipe; CPU AVX2 without AMX/AVX512-BF16"
    assert len(messages) == 1 and messages[0].startswith("warning:") and "slower" in messages[0]


def test_pinned_fp32_says_only_that(monkeypatch):
    """A recipe's fp32 on bf16 hardware: no hardware fact or measurement that reads like a contradiction."""
    _cpu(monkeypatch, {"amx_bf16"})
    _no_timing(monkeypatch)
    messages = []
    used = precision.resolve_precision("fp32", torch.device("cpu"), log=messages.append)
    assert used == ("fp32", "set in the recipe")
    assert messages == []


def test_generate_passes_pad_id_zero(tmp_path, monkeypatch):
    """`pad_token_id or eos` would turn a real pad id 0 into the EOS id."""
    import random

    from tunelab import models, tokenizers
    from tunelab.commands import evaluate

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
