"""The shared method suite: every entry of tunelab.methods.METHODS with the clm objective, and every other
entry of tunelab.objectives.OBJECTIVES with full and lora, through the real finetune stage.

A new method or objective joins by its registry line. For each case, on a tiny saved model (model.path, so
methods that adapt a trained model, like lora, run too; an encoder for the encoder objectives):
  - a few steps train and the loss falls;
  - exactly the method's trainable parameters change, tensor by tensor (the rest stay bit-identical;
    "trainable" is every tensor it ever handed to the optimizer, so switching methods like LISA fit);
    a method that trains single entries (sparse) names them with `trained_entries()` -> {name: bool
    mask}, and the entries outside stay bit-identical too;
  - final/ (save_final) reloads with models.load_model to the same logits as the trained model in memory;
  - a run killed with SIGKILL and resumed logs the same losses as an uninterrupted one (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import tunelab.methods
import tunelab.objectives
import tunelab.train.loop
from conftest import pairs_file, run_and_sigkill, run_cli, write_corpus
from tunelab import models, tokenizers
from tunelab.recipe import load_recipe
from tunelab.runs import read_metrics, train_losses
from tunelab.stages import run_stage

METHOD_NAMES = sorted(tunelab.methods.METHODS)
OBJECTIVE_NAMES = sorted(tunelab.objectives.OBJECTIVES)
# Every method with clm; every other objective with full and lora (the product where it is meaningful).
CASES = [(m, "clm") for m in METHOD_NAMES] + [(m, o) for o in OBJECTIVE_NAMES if o != "clm" for m in ("full", "lora")]
CASE_IDS = [m if o == "clm" else f"{o}-{m}" for m, o in CASES]
SEQ = 32
# Options a method needs to run on the suite's plain base model (no options: its defaults).
SUITE_OPTIONS = {"masked": {"sparsity": 0.5},  # no masks.safetensors in the base: prune by magnitude first
                 "lisa": {"gamma": 1, "interval": 2}, "hft": {"interval": 2},  # switch 3 times in 6 steps
                 "sparse": {"density": 0.05, "calibration_steps": 1},
                 "shira": {"r": 4},  # the default 32 * (32 + 32) entries exceed a 32x32 matrix
                 "trainable_tokens": {"tokens": list(range(0, 384, 2))},  # no default: the tokens are the point
                 "peft": {"type": "hra"}}  # the entry for the other peft methods: one of them
OBJECTIVE_OPTIONS = {"dpo": {"beta": 0.5},  # with lora: the adapter-disabled reference; with full: the cached one
                     "mlm": {"mlm_probability": 0.5}}  # more targets a step: a loss that falls visibly in 6 steps
# Methods whose trainable set may cover the whole model over a run (the others must train a small part).
MAY_TRAIN_ALL = {"full", "masked", "lisa", "hft", "mezo"}
# Objectives that train on preference pairs: the suite gives them pairs made from the same corpus (pairs_file).
PREFERENCE = {o for o in OBJECTIVE_NAMES if tunelab.objectives.objective_class(o).data_format == "preference"}
ENCODER = {o for o in OBJECTIVE_NAMES if tunelab.objectives.objective_class(o).model_kind == "encoder"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("suite") / "corpus", n_docs=30, seed=4)


def save_base(path: Path, corpus: Path, preset: str, **overrides) -> Path:
    """A tiny trained-looking model + tokenizer on disk: what a finetune's model.path points at."""
    texts = [p.read_text() for p in sorted(corpus.rglob("*.txt"))]
    tok = tokenizers.train_tokenizer(texts, vocab_size=384)
    torch.manual_seed(0)
    model = models.build_model(preset, tok, overrides)
    with torch.no_grad():  # off the init, so a method that re-initialises something would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "model", corpus, "llama-micro")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, corpus) -> Path:
    return save_base(tmp_path_factory.mktemp("encoder") / "model", corpus, "bert-tiny", hidden_size=32,
                     intermediate_size=64)


@pytest.fixture
def base_for(request):
    """The base a case trains: the encoder for the encoder objectives, else the causal model."""
    return lambda objective: request.getfixturevalue("encoder_dir" if objective in ENCODER else "base_dir")


def write_recipe(path: Path, corpus: Path, base: Path, method: str, objective: str = "clm", **train) -> Path:
    path.write_text(yaml.safe_dump({
        "kind": "finetune",
        "name": f"suite-{method}-{objective}",
        "model": {"path": str(base)},
        "data": ({"train": [{"source": str(pairs_file(corpus)), "format": "preference"}], "seq_len": SEQ}
                 if objective in PREFERENCE else {"train": str(corpus), "seq_len": SEQ}),
        "method": {"name": method, "options": SUITE_OPTIONS.get(method, {})},
        "objective": {"name": objective, "options": OBJECTIVE_OPTIONS.get(objective, {})},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "log_every": 1,
                  "eval_every": 0, "eval_max_tokens": 256, "checkpoint_every": 3, "keep_checkpoints": 3,
                  "precision": "fp32", "schedule": {"name": "constant"}, **train},
    }))
    return path


@pytest.fixture
def captured(monkeypatch):
    """Wraps the loop: the prepared model's parameters before training, every name the method ever
    handed to the optimizer (trainable_params, over all steps), and the trained model."""
    record: dict = {}
    real_train = tunelab.train.loop.train

    def train(model, method, objective, *args, **kwargs):
        record["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        record["trainable"] = set()
        real = method.trainable_params

        def trainable_params(m):
            named = real(m)
            record["trainable"].update(n for n, _ in named)
            return named

        method.trainable_params = trainable_params
        result = real_train(model, method, objective, *args, **kwargs)
        record["model"], record["method"] = result["model"], method
        return result

    monkeypatch.setattr(tunelab.train.loop, "train", train)
    return record


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, **({} if models.is_encoder(model) else {"use_cache": False})).logits


@pytest.mark.parametrize(("method", "objective"), CASES, ids=CASE_IDS)
def test_method_trains_only_its_parameters_and_saves_what_it_trained(tmp_path, corpus, base_for, captured, method,
                                                                     objective):
    base_dir = base_for(objective)
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", corpus, base_dir, method, objective))
    run = run_stage(cfg, out=tmp_path / "run", quiet=True)

    losses = train_losses(run / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] - 0.02, losses  # it learns

    model, before, trainable = captured["model"], captured["before"], captured["trainable"]
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert trainable and trainable <= after.keys()
    for name, p in after.items():
        if name in trainable:
            assert not torch.equal(p.detach(), before[name]), f"{method}: trainable {name} did not change"
        else:
            assert torch.equal(p.detach(), before[name]), f"{method}: frozen {name} changed"
            assert not p.requires_grad, f"{method}: {name} requires grad but is not handed to the optimizer"
    if method == "masked":  # every pruned weight is 0 before training and still exactly 0 after it
        masks = captured["method"].masks
        assert masks and all(m.dtype == torch.bool for m in masks.values())
        for name, mask in masks.items():
            assert int((~mask).sum()) == round(0.5 * mask.numel()), name
            assert torch.all(before[name][~mask] == 0) and torch.all(after[name].detach()[~mask] == 0), name
            assert torch.all(after[name].detach()[mask] != before[name][mask]), f"{name}: kept weights did not train"
    # A method that trains single entries (sparse) says which (trained_entries): the others keep their values.
    entries = getattr(captured["method"], "trained_entries", dict)()
    for name, mask in entries.items():
        assert name in trainable, name
        assert torch.equal(after[name].detach()[~mask], before[name][~mask]), f"{method}: {name} changed off its entries"
    if method not in MAY_TRAIN_ALL:  # a parameter-efficient method trains a small part of the model
        n_trainable = sum(int(entries[n].sum()) if n in entries else after[n].numel() for n in trainable)
        assert n_trainable < 0.5 * sum(p.numel() for p in after.values())

    # final/ through save_final, loaded the way every tunelab command loads a model (or adapter).
    tok = tokenizers.load_tokenizer(str(run / "final"))
    ids = torch.tensor([tok("the model data token train loss step layer weight")["input_ids"]])
    reloaded = models.load_model(str(run / "final"))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    # ... and it is not just the base model.
    assert not torch.equal(logits(models.load_model(str(base_dir)), ids), logits(reloaded, ids))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "objective"), CASES, ids=CASE_IDS)
def test_method_resumes_exactly_after_sigkill(tmp_path, corpus, base_for, method, objective):
    steps = 24
    recipe = write_recipe(tmp_path / "r.yaml", corpus, base_for(objective), method, objective, max_steps=steps,
                          checkpoint_every=4,
                          lr=3e-3, schedule={"name": "cosine", "warmup_steps": 3})
    # The uninterrupted reference runs in this process (one interpreter start less); the killed and the
    # resumed runs are real `tunelab finetune` processes.
    run_stage(load_recipe(recipe), out=tmp_path / "ref", quiet=True)

    out = tmp_path / "killed"
    killed_at = run_and_sigkill("finetune", recipe, out, 6)
    assert killed_at < steps, "killed too late to test anything"
    assert not (out / "final").exists()

    resumed = run_cli("finetune", str(recipe), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(tmp_path / "ref" / "metrics.jsonl"), train_losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bit-identical in fp32 on CPU
    resumes = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "resume"]
    assert resumes and 0 < resumes[-1]["step"] <= killed_at


# The memory options: each must train as without it, or be refused when the recipe loads.
# option -> (its value, the method's and objective's refusal hook, the module and function that must run when it acts)
MEMORY_OPTIONS = {
    "gradient_checkpointing": (True, "gradient_checkpointing_refusal", ("transformers.modeling_utils", "checkpoint")),
    "loss_chunk_tokens": (7, "chunked_loss_refusal", ("tunelab.train.chunked_loss", "_chunk_nll")),
}


@pytest.mark.parametrize("option", sorted(MEMORY_OPTIONS))
@pytest.mark.parametrize(("method", "objective"), CASES, ids=CASE_IDS)
def test_method_under_a_memory_option_trains_the_same_or_is_refused(tmp_path, corpus, base_for, monkeypatch, method,
                                                                   objective, option):
    """train.gradient_checkpointing recomputes activations in the backward pass, train.loss_chunk_tokens the
    head's logits chunk by chunk: the same losses and weights as without them, with the option really acting
    (a spy on the function that does the work); a method that cannot use one is refused at load."""
    import importlib

    from tunelab.errors import ConfigError

    value, refusal_hook, (module_name, function) = MEMORY_OPTIONS[option]
    base_dir = base_for(objective)
    recipe = write_recipe(tmp_path / "on.yaml", corpus, base_dir, method, objective, max_steps=3, checkpoint_every=0,
                          **{option: value})
    refusal = getattr(tunelab.methods.create_method(method, SUITE_OPTIONS.get(method, {})), refusal_hook)() or \
        getattr(tunelab.objectives.create_objective(objective, {}), refusal_hook, lambda: None)()
    if refusal:
        with pytest.raises(ConfigError, match=f"train.{option}: not with (method {method}|objective {objective}): "):
            load_recipe(recipe)
        return
    calls = []
    module = importlib.import_module(module_name)
    real = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *a, **k: calls.append(1) or real(*a, **k))
    with_option = run_stage(load_recipe(recipe), out=tmp_path / "on", quiet=True)
    assert calls, f"{method}: {option} did not act"
    plain = run_stage(load_recipe(write_recipe(tmp_path / "plain.yaml", corpus, base_dir, method, objective,
                                               max_steps=3, checkpoint_every=0)), out=tmp_path / "plain", quiet=True)
    got, expected = train_losses(with_option / "metrics.jsonl"), train_losses(plain / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (method, objective, step)
    tok = tokenizers.load_tokenizer(str(with_option / "final"))
    ids = torch.tensor([tok("the model data token train loss step layer weight")["input_ids"]])
    # MeZO's step is (L+ - L-) / 2 eps: the chunked loss's other summation order (~1e-7) comes out x 500. A
    # preference loss compares two replies' summed log-probs through a sigmoid, and the other summation order
    # moves its weights a little further (seen: SimPO, 1.2e-5 on 1 of 3,840 final logits).
    atol = 1e-3 if method == "mezo" else 1e-4 if objective in PREFERENCE else 1e-5
    torch.testing.assert_close(logits(models.load_model(str(with_option / "final")), ids),
                               logits(models.load_model(str(plain / "final")), ids), rtol=1e-4, atol=atol)
