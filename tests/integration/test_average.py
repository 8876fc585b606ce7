"""`tunelab average` and the `average` stage kind: the uniform mean of a real run's checkpoints, as a plain HF
model directory; in a pipeline after the run it averages, scored before and after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from tunelab.errors import ConfigError, ModelError, RunDirError
from tunelab.ops.average import parse_steps
from tunelab.runs import file_sha256
from tunelab.stages.average import cli_recipe, run_average


def average_checkpoints(run, out, last=None, steps=None, log=print) -> Path:
    """What `tunelab average RUN --out OUT [--last K | --steps ...]` runs."""
    return run_average(cli_recipe(run, last=last, steps=steps, name=Path(out).name), out=out, log=log)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir) -> Path:
    """9 steps of llama-micro, a checkpoint every 3 steps, all three kept."""
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    root = tmp_path_factory.mktemp("average")
    recipe = {
        "name": "avg",
        "model": {"preset": "llama-micro"},
        "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
        "data": {"train": str(corpus_dir), "seq_len": 32},
        "train": {"max_steps": 9, "micro_batch_size": 4, "lr": 3e-3, "log_every": 3, "eval_every": 0,
                  "precision": "fp32", "eval_max_tokens": 512, "checkpoint_every": 3, "keep_checkpoints": 3},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = run_stage(load_recipe(str(root / "r.yaml")), out=root / "run", quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6", "step-9"]
    return run


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_mean_of(out: Path, run: Path, steps: list[int]) -> None:
    inputs = [_tensors(run / "checkpoints" / f"step-{s}" / "model.safetensors") for s in steps]
    averaged = _tensors(out / "model.safetensors")
    assert averaged.keys() == inputs[0].keys()  # same key set: a tied embedding/head stays stored once
    for key, tensor in averaged.items():
        expected = torch.stack([t[key].to(torch.float32) for t in inputs]).mean(0)
        assert tensor.dtype == inputs[0][key].dtype, key
        assert torch.allclose(tensor.to(torch.float32), expected, rtol=1e-6, atol=1e-7), key
    assert any(not torch.equal(averaged[k], inputs[-1][k]) for k in averaged)  # it is not a copy of the last


def _rewrite_manifest(ckpt: Path) -> None:
    """After editing a checkpoint's files on purpose: a manifest that matches them again (so it stays intact)."""
    manifest = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(ckpt.iterdir()) if p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _copy_run(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to))


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_average_last_three_is_a_plain_hf_model(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "avg"
    result = run_cli("average", str(trained_run), "--last", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "step 3, step 6, step 9" in result.stderr  # the log names what went in
    _assert_mean_of(out, trained_run, [3, 6, 9])

    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["name"], lineage["stage"], lineage["method"]) == ("avg", "average", {"name": "uniform", "k": 3})
    assert [p["step"] for p in lineage["parents"]] == [3, 6, 9]
    for parent in lineage["parents"]:
        ckpt = trained_run / "checkpoints" / f"step-{parent['step']}"
        assert parent["role"] == "average" and parent["weight"] == pytest.approx(1 / 3)
        assert parent["path"] == str(ckpt.resolve())
        assert parent["file_sha256"] == file_sha256(ckpt / "model.safetensors")
    assert (out / "config.json").read_text() == (trained_run / "checkpoints" / "step-9" / "config.json").read_text()

    # Plain transformers loads it, with the averaged weights (the tied head included).
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    averaged = _tensors(out / "model.safetensors")
    state = model.state_dict()
    for key, tensor in averaged.items():
        assert torch.equal(state[key], tensor), key
    ids = torch.tensor([tok("the model data token train loss")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    result = run_cli("eval", str(out), "--data", _corpus_of(trained_run), "--seq-len", "32", "--max-tokens", "256",
                     "--json")
    assert result.returncode == 0, result.stderr
    scores = next(iter(json.loads(result.stdout).values()))
    assert scores["loss"] > 0 and scores["split"] == "held-out"  # lineage leads eval to the run's held-out text


def _corpus_of(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["data"]["train"][0]["source"]


def test_average_named_steps_and_skipping_a_corrupt_checkpoint(trained_run, tmp_path):
    out = average_checkpoints(trained_run, tmp_path / "two", steps=parse_steps("9, 3"), log=lambda *a: None)
    _assert_mean_of(out, trained_run, [3, 9])
    assert [p["step"] for p in json.loads((out / "lineage.json").read_text())["parents"]] == [3, 9]

    run = _copy_run(trained_run, tmp_path / "run")
    weights = run / "checkpoints" / "step-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    logged = []
    out = average_checkpoints(run, tmp_path / "skip", last=2, log=logged.append)
    assert any("skipping checkpoint" in line and "step-6" in line for line in logged)
    assert [p["step"] for p in json.loads((out / "lineage.json").read_text())["parents"]] == [3, 9]
    with pytest.raises(RunDirError, match=r"only 2 intact checkpoints \(1 more not intact\)"):
        average_checkpoints(run, tmp_path / "three", last=3, log=lambda *a: None)
    with pytest.raises(RunDirError, match="step-6 is not intact"):
        average_checkpoints(run, tmp_path / "named", steps=[6, 9], log=lambda *a: None)
    _nothing_written(tmp_path / "three")
    _nothing_written(tmp_path / "named")


def test_config_and_tokenizer_fall_back_to_final(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    for ckpt in (run / "checkpoints").iterdir():  # checkpoints from before they were HF model dirs
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (ckpt / name).unlink()
        _rewrite_manifest(ckpt)
    out = average_checkpoints(run, tmp_path / "avg", last=3, log=lambda *a: None)
    assert (out / "config.json").read_text() == (run / "final" / "config.json").read_text()
    assert (out / "tokenizer.json").read_bytes() == (run / "final" / "tokenizer.json").read_bytes()
    assert json.loads((out / "lineage.json").read_text())["config_from"] == str((run / "final").resolve())

    shutil.rmtree(run / "final")
    with pytest.raises(ModelError, match="hold config.json"):
        average_checkpoints(run, tmp_path / "none", last=3, log=lambda *a: None)
    _nothing_written(tmp_path / "none")


@pytest.mark.parametrize("case", ["missing_run", "too_few"])
def test_cli_errors_are_one_line_exit_2(trained_run, tmp_path, case):
    args, needles = {
        "missing_run": ([str(tmp_path / "nope")], ["nope does not exist"]),
        "too_few": ([str(trained_run), "--last", "4"],
                    ["has only 3 intact checkpoints", "train.keep_checkpoints >= 4", "--last 3"]),
    }[case]
    out = tmp_path / "out"
    result = run_cli("average", *args, "--out", str(out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    _nothing_written(out)


def test_errors(trained_run, tmp_path):
    quiet = {"log": lambda *a: None}
    with pytest.raises(RunDirError, match="no checkpoint at step 5 \\(it has steps 3, 6, 9\\)"):
        average_checkpoints(trained_run, tmp_path / "a", steps=[3, 5], **quiet)
    with pytest.raises(ConfigError, match="last and steps: give one of them"):
        average_checkpoints(trained_run, tmp_path / "a", last=2, steps=[3, 6], **quiet)
    with pytest.raises(ConfigError, match="--steps"):
        parse_steps("3,six")
    _nothing_written(tmp_path / "a")

    # An occupied --out is refused and left alone; an empty one is used.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        average_checkpoints(trained_run, occupied, last=3, **quiet)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert (average_checkpoints(trained_run, tmp_path / "empty", last=2, **quiet) / "model.safetensors").is_file()

    # A run without checkpoints, and an adapter run.
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(RunDirError, match="no checkpoints"):
        average_checkpoints(bare, tmp_path / "a", **quiet)
    adapter = _copy_run(trained_run, tmp_path / "adapter")
    ckpt = adapter / "checkpoints" / "step-9"
    (ckpt / "model.safetensors").rename(ckpt / "adapter.safetensors")
    _rewrite_manifest(ckpt)
    with pytest.raises(ModelError, match="averaging adapters is not supported yet; export/merge them first"):
        average_checkpoints(adapter, tmp_path / "a", **quiet)
    _nothing_written(tmp_path / "a")


@pytest.mark.parametrize("change", ["shape", "dtype", "missing_key"])
def test_checkpoints_of_different_models_are_refused(trained_run, tmp_path, change):
    from safetensors.torch import save_file

    run = _copy_run(trained_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step-6"
    tensors = _tensors(ckpt / "model.safetensors")
    key = "model.norm.weight"
    if change == "shape":
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    elif change == "dtype":
        tensors[key] = tensors[key].to(torch.bfloat16)
    else:
        del tensors[key]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _rewrite_manifest(ckpt)
    with pytest.raises(ModelError, match=f"checkpoints differ: .*{key}"):
        average_checkpoints(run, tmp_path / "avg", last=3, log=lambda *a: None)
    _nothing_written(tmp_path / "avg")


def test_average_stage_in_a_pipeline_scores_before_and_after(trained_run, tmp_path):
    """`average: RECIPE` after a training stage (${base} is its final/: the run around it is averaged), scored on
    the run's held-out split, the same numbers `tunelab eval` gives."""
    from tunelab.commands.evaluate import evaluate_model
    from tunelab.commands.pipeline import run_pipeline

    recipe = yaml.safe_load((trained_run.parent / "r.yaml").read_text())
    recipe["train"]["max_steps"] = 6
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    corpus = _corpus_of(trained_run)
    (tmp_path / "avg.yaml").write_text(yaml.safe_dump({"run": "${base}", "last": 2, "eval": {
        "data": [corpus], "seq_len": 32, "max_tokens": 256}}))
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({"name": "p", "stages": [
        {"name": "base", "pretrain": "r.yaml"}, {"name": "avg", "average": "avg.yaml"}]}))
    outputs = run_pipeline(tmp_path / "pipe.yaml", out=tmp_path / "out", quiet=True)
    base, out = tmp_path / "out" / "base", outputs["avg"]
    assert out == tmp_path / "out" / "avg" / "final"
    _assert_mean_of(out, base, [3, 6])
    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["schema_version"], lineage["stage"], lineage["run"]) == (2, "average", str(base.resolve()))
    record = json.loads((out / "average.json").read_text())
    (domain,) = record["eval"]["after"]
    assert record["eval"]["splits"] == {domain: {"split": "held-out", "eval_fraction": 0.02}}
    assert record["eval"]["before_model"] == str((base / "checkpoints" / "step-6").resolve())
    for model, when in ((base / "checkpoints" / "step-6", "before"), (out, "after")):
        (scored,) = evaluate_model(str(model), [corpus], seq_len=32, max_tokens=256, log=lambda *a: None).values()
        assert scored["loss"] == pytest.approx(record["eval"][when][domain]["loss"], rel=1e-6)
    assert run_pipeline(tmp_path / "pipe.yaml", out=tmp_path / "out", quiet=True) == outputs  # up to date: skipped
