"""Bad input: one line on stderr naming the problem and the fix, exit code 2, nothing lost."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from conftest import run_cli


def _recipe(path: Path, data, **sections) -> Path:
    recipe = {"name": "bad", "model": {"preset": "llama-micro"},
              "tokenizer": {"vocab_size": 320, "train_bytes": 50_000},
              "data": {"train": data, "seq_len": 32},
              "train": {"max_steps": 2, "micro_batch_size": 2, "log_every": 1}}
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_line_error(result, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "seq_len", "unknown_key", "bad_type"])
def test_bad_input_is_one_line_exit_2(tmp_path, corpus_dir, case):
    if case == "missing":
        recipe, needles = _recipe(tmp_path / "r.yaml", str(tmp_path / "nope.txt")), ["nope.txt"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n")
        recipe, needles = _recipe(tmp_path / "r.yaml", str(tmp_path / "empty.txt")), ["empty.txt"]
    elif case == "binary":
        (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
        recipe, needles = _recipe(tmp_path / "r.yaml", str(tmp_path / "blob.txt")), ["blob.txt"]
    elif case == "seq_len":
        recipe = _recipe(tmp_path / "r.yaml", str(corpus_dir), model={"overrides": {"max_position_embeddings": 16}})
        needles = ["data.seq_len=32", "16"]
    elif case == "unknown_key":
        recipe, needles = _recipe(tmp_path / "r.yaml", str(corpus_dir), train={"warmup": 3}), ["train.warmup"]
    else:
        recipe, needles = _recipe(tmp_path / "r.yaml", str(corpus_dir), train={"max_steps": "many"}), ["train.max_steps"]
    result = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    _assert_one_line_error(result, *needles)
    assert not (tmp_path / "run" / "config.yaml").exists()  # failed before a run was recorded


def test_non_utf8_is_decoded_and_counted(tmp_path):
    text = ("Some words about training models and data. " * 200).encode()
    (tmp_path / "latin1.txt").write_bytes(text + "caf\xe9 na\xefve".encode("latin-1") + b"\n" + text)
    recipe = _recipe(tmp_path / "r.yaml", str(tmp_path / "latin1.txt"))
    result = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    lineage = yaml.safe_load((tmp_path / "run" / "lineage.json").read_text())
    assert lineage["data"][0]["decode_errors"] == 2


def test_tokenizer_bigger_than_model(tmp_path, corpus_dir):
    small = _recipe(tmp_path / "small.yaml", str(corpus_dir))
    assert run_cli("pretrain", str(small), "--out", str(tmp_path / "small"), "--quiet").returncode == 0
    big = _recipe(tmp_path / "big.yaml", str(corpus_dir), tokenizer={"vocab_size": 600})
    assert run_cli("pretrain", str(big), "--out", str(tmp_path / "big"), "--quiet").returncode == 0
    mismatch = _recipe(tmp_path / "mix.yaml", str(corpus_dir), model={"path": str(tmp_path / "small" / "final")},
                       tokenizer={"path": str(tmp_path / "big" / "final")})
    result = run_cli("pretrain", str(mismatch), "--out", str(tmp_path / "mix"), "--quiet")
    _assert_one_line_error(result, "tokenizer", "embedding")


def test_existing_run_is_never_overwritten(tmp_path, corpus_dir):
    recipe = _recipe(tmp_path / "r.yaml", str(corpus_dir))
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), "--quiet").returncode == 0
    before = _tree_digest(tmp_path / "run")
    result = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    _assert_one_line_error(result, "--resume", "--out")
    assert _tree_digest(tmp_path / "run") == before


def test_missing_model_dir_fails_at_once_without_the_hub(tmp_path):
    for command in (["eval", str(tmp_path / "runs" / "nope")], ["generate", "./nope", "--prompt", "x"]):
        result = run_cli(*command, timeout=60)
        _assert_one_line_error(result, "nope", "does not exist")


@pytest.mark.parametrize("command,needles", [
    (["pretrain", "lora-code"], ["kind", "tunelab finetune"]),  # a finetune recipe run as pretrain
    (["finetune", "quickstart"], ["model.path"]),  # a recipe without a kind run as finetune needs a model
    (["finetune", "quickstart", "--set", "model.path=x", "--set", "kind=distill"], ["kind", "distill"]),
    (["finetune", "lora-code", "--set", "method.options.rank=4"], ["method.options", "rank"]),
])
def test_recipe_kind_errors_are_one_line_exit_2(tmp_path, command, needles):
    result = run_cli(*command, "--out", str(tmp_path / "run"), "--quiet", timeout=120)
    _assert_one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_is_one_line_exit_2_and_keeps_checkpoints(tmp_path, corpus_dir):
    recipe = _recipe(tmp_path / "r.yaml", str(corpus_dir),
                     train={"lr": 1e30, "max_steps": 6, "checkpoint_every": 1, "precision": "fp32", "grad_clip": None,
                            "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0})
    result = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    _assert_one_line_error(result, "non-finite", "train.lr")
    assert not (tmp_path / "run" / "final").exists()
