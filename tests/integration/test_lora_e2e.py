"""LoRA end to end through the CLI: pretrain -> finetune (adapter) -> eval/generate/export, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_and_sigkill, run_cli
from tunelab.runs import read_metrics, train_losses

# peft 0.21 reads a property transformers 5 deprecated, in PeftModel.from_pretrained called directly below.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
LORA = {"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.1}}  # dropout: resume must restore its RNG


def recipe(path: Path, corpus: Path, kind: str = "pretrain", **train) -> Path:
    data = {
        "name": "tiny-" + kind,
        "model": {"preset": "llama-micro"},
        "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
        "data": {"train": str(corpus), "seq_len": 32},
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 6,
                  "precision": "fp32", "eval_max_tokens": 512, "checkpoint_every": 3, "keep_checkpoints": 2,
                  "schedule": {"name": "cosine", "warmup_steps": 2}, **train},
    }
    if kind == "finetune":
        data["kind"] = "finetune"
        data["method"] = LORA
        data["train"]["lr"] = 1e-2  # LoRA's usual, larger step
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir) -> Path:
    """A tiny model pretrained through the CLI: the base every finetune here adapts."""
    root = tmp_path_factory.mktemp("base")
    result = run_cli("pretrain", str(recipe(root / "pretrain.yaml", corpus_dir)), "--out", str(root / "run"), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.slow
def test_lora_finetune_through_the_cli(tmp_path, corpus_dir, base_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import models

    base = base_run / "final"
    ft_recipe = recipe(tmp_path / "finetune.yaml", corpus_dir, kind="finetune")
    result = run_cli("finetune", str(ft_recipe), "--set", f"model.path={base}", "--set", "method.name=lora",
                     "--out", str(tmp_path / "ft"), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ft"

    # final/ is a PEFT adapter on the base, by absolute path and weight hash.
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    info = json.loads((final / "tunelab_adapter.json").read_text())
    assert info["base_weights_sha256"] == models.weights_sha256(AutoModelForCausalLM.from_pretrained(base))
    # Checkpoints hold the adapter only.
    for ckpt in (run / "checkpoints").iterdir():
        assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists(), ckpt
    steps = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    assert [e["step"] for e in steps] == list(range(1, 13))

    # Plain peft loads it, and it computes what tunelab's loader computes; the adapter changed the function.
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("the model data token train loss")["input_ids"]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    torch.testing.assert_close(_logits(plain, ids), _logits(models.load_model(str(final)), ids), rtol=0, atol=0)
    assert not torch.allclose(_logits(plain, ids), _logits(AutoModelForCausalLM.from_pretrained(base), ids))

    # Every command that takes a model directory takes the adapter.
    evaluated = run_cli("eval", str(final), "--data", str(corpus_dir), "--seq-len", "32", "--max-tokens", "512",
                        "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert all(r["loss"] > 0 for r in json.loads(evaluated.stdout).values())
    generated = run_cli("generate", str(final), "--prompt", "the model", "--greedy", "--max-new-tokens", "5")
    assert generated.returncode == 0 and generated.stdout.startswith("the model"), generated.stderr[-3000:]

    refused = run_cli("export", str(run), "--out", str(tmp_path / "exported"))
    assert refused.returncode == 2 and "pass --merge" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "exported").exists()
    exported = run_cli("export", str(run), "--merge", "--out", str(tmp_path / "exported"), "--quiet")
    assert exported.returncode == 0, exported.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(_logits(merged, ids), _logits(plain, ids), rtol=0, atol=1e-4)
    lineage = json.loads((tmp_path / "exported" / "lineage.json").read_text())
    assert [p["role"] for p in lineage["parents"]] == ["base", "adapter"] and lineage["merged"] is True
    again = run_cli("export", str(run), "--merge", "--out", str(tmp_path / "exported"))
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [2, 7])
def test_lora_exact_resume_after_sigkill(tmp_path, corpus_dir, base_run, kill_after_step):
    """A LoRA finetune SIGKILLed mid-flight and resumed logs the same loss at every step as an uninterrupted one."""
    ft_recipe = recipe(tmp_path / "finetune.yaml", corpus_dir, kind="finetune", max_steps=14, checkpoint_every=3)
    model_path = ("--set", f"model.path={base_run / 'final'}")
    reference = run_cli("finetune", str(ft_recipe), *model_path, "--out", str(tmp_path / "ref"), "--quiet")
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    assert run_and_sigkill("finetune", ft_recipe, out, kill_after_step, *model_path) < 14, "killed too late"

    resumed = run_cli("finetune", str(ft_recipe), *model_path, "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(tmp_path / "ref" / "metrics.jsonl"), train_losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, 15))
    assert got == expected  # bit-identical floats in fp32 on CPU
    assert any(e["event"] == "resume" for e in read_metrics(out / "metrics.jsonl"))
    # The resumed adapter is the uninterrupted one, tensor for tensor.
    from safetensors.torch import load_file

    ref, res = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (tmp_path / "ref", out))
    assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)
