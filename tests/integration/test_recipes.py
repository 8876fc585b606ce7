"""Every shipped recipe and pipeline runs end to end at toy scale; the quickstart works offline."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from tunelab.config import RECIPES_DIR
from tunelab.runs import read_metrics

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
# Scale knobs only: what the recipe trains, how, and on which eval domains stays as shipped.
TOY = ["--set", "train.max_steps=3", "--set", "train.micro_batch_size=2", "--set", "data.seq_len=32",
       "--set", "train.eval_max_tokens=256", "--set", "tokenizer.train_bytes=100000",
       "--set", "train.grad_accum=1"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipe_at_toy_scale(tmp_path, corpus_dir, recipe):
    # The overrides every training recipe must accept: max_steps, seed, checkpoint_every, log_every, data.train.
    result = run_cli("pretrain", recipe, "--out", str(tmp_path / "run"), "--quiet", *TOY,
                     "--set", "train.seed=1", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
                     "--set", f"data.train={corpus_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]
    assert {e["domain"] for e in events if e["event"] == "eval"} >= {"corpus"}
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@pytest.mark.slow
def test_shipped_pipeline_at_toy_scale_and_skips_done_stages(tmp_path, corpus_dir):
    pipeline = RECIPES_DIR / "pipelines" / "quickstart-to-code.yaml"
    args = ["run", str(pipeline), "--out", str(tmp_path / "pipe"), *TOY, "--set", "tokenizer.vocab_size=512"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "pipe"
    for stage in ("base", "code-full", "code-bitfit"):
        assert (root / stage / "final" / "config.json").is_file(), stage
    # The adapted models start from the base stage's output, and say so.
    lineage = json.loads((root / "code-full" / "lineage.json").read_text())
    assert lineage["parent"]["path"] == str((root / "base" / "final").resolve())
    scores = json.loads((root / "score-code-full" / "eval.json").read_text())
    assert set(scores) == {"prose", "code"} and all(v["bpb"] > 0 for v in scores.values())

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("up to date, skipped") == 6


@pytest.mark.slow
def test_quickstart_offline(tmp_path):
    result = run_cli("quickstart", "--out", str(tmp_path / "qs"), "--set", "train.max_steps=4",
                     "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
                     "--set", "train.eval_max_tokens=512")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "run directory" in out and str(tmp_path / "qs") in out
    assert "sample" in out
    events = read_metrics(tmp_path / "qs" / "metrics.jsonl")
    assert {e["domain"] for e in events if e["event"] == "eval"} == {"prose", "code", "tests"}


@pytest.mark.slow
def test_eval_and_generate_cli(tmp_path, corpus_dir):
    recipe_run = run_cli("pretrain", "quickstart", "--out", str(tmp_path / "run"), "--quiet", *TOY,
                         "--set", f"data.train={corpus_dir}", "--set", "data.eval=[]")
    assert recipe_run.returncode == 0, recipe_run.stderr[-3000:]
    final = tmp_path / "run" / "final"
    result = run_cli("eval", str(final), "--data", str(corpus_dir), "--seq-len", "32", "--max-tokens", "256", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert set(scores) == {"corpus"} and scores["corpus"]["loss"] > 0 and scores["corpus"]["tokens"] > 0
    # The held-out score equals what training logged at the end (same split, same windows, same model).
    final_eval = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["event"] == "eval"][-1]
    assert scores["corpus"]["tokens"] == final_eval["tokens"]
    assert scores["corpus"]["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)
    assert scores["corpus"]["bpb"] == pytest.approx(final_eval["bpb"], rel=1e-5)

    gen = run_cli("generate", str(final), "--prompt", "the model", "--max-new-tokens", "8", "--greedy")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("the model")
    again = run_cli("generate", str(final), "--prompt", "the model", "--max-new-tokens", "8", "--greedy")
    assert again.stdout == gen.stdout  # greedy decoding is deterministic
