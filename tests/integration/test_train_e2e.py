"""End-to-end training: run directory, HF reload, exact resume after SIGKILL, DDP == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_and_sigkill, run_cli
from tunelab.runs import read_metrics, train_losses


def tiny_recipe(path: Path, corpus: Path, **train) -> Path:
    recipe = {
        "name": "tiny",
        "model": {"preset": "llama-micro"},
        "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
        "data": {"train": str(corpus), "seq_len": 32},
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 6, "precision": "fp32",
                  "eval_max_tokens": 512, "checkpoint_every": 3, "keep_checkpoints": 2,
                  "schedule": {"name": "cosine", "warmup_steps": 2}, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_directory_and_hf_reload(tmp_path, corpus_dir):
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import models
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", corpus_dir))
    run = run_stage(cfg, out=tmp_path / "run", quiet=True)

    for name in ("config.yaml", "metrics.jsonl", "env.json", "lineage.json", "final/config.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-12", "step-9"]  # keep last 2

    events = read_metrics(run / "metrics.jsonl")
    steps = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert all({"step", "tokens", "lr", "loss"} <= e.keys() for e in steps)
    assert steps[-1]["tokens"] == 12 * 4 * 32
    evals = [e for e in events if e["event"] == "eval"]
    assert {e["step"] for e in evals} == {6, 12} and all(e["bpb"] > 0 for e in evals)
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns something

    lineage = json.loads((run / "lineage.json").read_text())
    parent = lineage["parents"][0]
    assert lineage["stage"] == "pretrain" and len(lineage["parents"]) == 1
    assert {k: parent[k] for k in ("role", "kind", "preset", "overrides")} == \
        {"role": "init", "kind": "preset", "preset": "llama-micro", "overrides": {}}
    assert len(parent["weights_sha256_in_memory"]) == 64
    assert len(lineage["data"][0]["content_hash"]) == 64 and lineage["data"][0]["train_tokens"] > 0
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"].startswith("2.13.0")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 12

    # Plain transformers loads final/ and gives the same logits as the last checkpoint's weights
    # loaded into a model built from the preset: two independent paths to the same function.
    tok = AutoTokenizer.from_pretrained(run / "final")
    hf_model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ref = models.build_model("llama-micro", tok).eval()
    load_model(ref, str(run / "checkpoints" / "step-12" / "model.safetensors"))
    ids = torch.tensor([tok("the model data token train loss")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [2, 7])
def test_exact_resume_after_sigkill(tmp_path, corpus_dir, kill_after_step):
    """A run SIGKILLed mid-flight and resumed logs the same loss at every step as an uninterrupted one."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, max_steps=14, checkpoint_every=3)
    reference = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "ref"), "--quiet")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    assert run_and_sigkill("pretrain", recipe, out, kill_after_step) < 14, "killed too late to test anything"

    resumed = run_cli("pretrain", str(recipe), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = train_losses(tmp_path / "ref" / "metrics.jsonl"), train_losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, 15))
    assert got == expected  # bit-identical floats in fp32 on CPU
    assert any(e["event"] == "resume" for e in read_metrics(out / "metrics.jsonl"))


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, corpus_dir):
    """torchrun with 2 ranks x micro-batch 2 == 1 process x micro-batch 4 (same global batch and order)."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, max_steps=8, checkpoint_every=4, eval_every=0)
    single = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "one"), "--quiet")
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "tunelab", "pretrain",
                          str(recipe), "--out", str(tmp_path / "two"), "--quiet",
                          "--set", "train.micro_batch_size=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = train_losses(tmp_path / "one" / "metrics.jsonl"), train_losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    # Rank 0 alone wrote the run directory and its checkpoints.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert (tmp_path / "two" / "final" / "config.json").is_file()


def _torchrun(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29500 + (os.getpid() + len(extra)) % 1000), "-m", "tunelab", "pretrain",
                           str(recipe), "--out", str(out), "--quiet", "--set", "train.micro_batch_size=2", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_ddp_resume_is_exact_with_per_rank_dropout(tmp_path, corpus_dir):
    """Each rank draws its own dropout stream, and every rank's RNG is checkpointed: a DDP run resumed
    from a checkpoint continues with the same losses as the uninterrupted DDP run."""
    import shutil

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, max_steps=8, checkpoint_every=4, eval_every=0,
                         keep_checkpoints=3)
    dropout = ["--set", "model.overrides={attention_dropout: 0.2}"]
    full = _torchrun(recipe, tmp_path / "full", *dropout)
    assert full.returncode == 0, full.stderr[-3000:]
    rng = torch.load(tmp_path / "full" / "checkpoints" / "step-4" / "rng.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # independent per rank

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-8")
    shutil.rmtree(tmp_path / "cut" / "final")
    resumed = _torchrun(recipe, tmp_path / "cut", "--resume", *dropout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(tmp_path / "full" / "metrics.jsonl"), train_losses(tmp_path / "cut" / "metrics.jsonl")
    assert got == expected  # bit-identical: same data slices, same per-rank dropout masks
