"""Continual training end to end: continuing a run (init_from: what is carried, what is reset), replay of
the ancestors' data, forgetting measured from a step-0 baseline (and equal to an independent `tunelab eval`),
mixture schedules, exact resume after SIGKILL, `tunelab anneal` branches, and one-line errors for bad input.

One tiny "prose" base run (a WSD schedule, checkpoints at steps 5 and 8) is shared by the whole module, and
one run continued from it on new data ("notes"). Everything runs on one CPU thread: these models are so small
that a second thread only adds synchronisation (and spins when the machine is busy)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_and_sigkill, run_cli, write_corpus
from tunelab.recipe import load_recipe, validate_recipe
from tunelab.runs import read_metrics, train_losses
from tunelab.stages import run_stage

SEQ = 32
EVAL_TOKENS = 256
BASE_STEPS, BRANCH_AT, DECAY = 8, 5, 3  # the base's WSD decays over its last 3 steps: exactly from step 5 on


@pytest.fixture(scope="module")
def one_thread():
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")  # the CLI subprocesses (run_cli, run_and_sigkill inherit os.environ)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    mp.undo()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("continual")
    return {"prose": write_corpus(root / "prose", n_docs=30, seed=0),
            "notes": write_corpus(root / "notes", n_docs=24, seed=1),
            "extra": write_corpus(root / "extra", n_docs=20, seed=2)}


def recipe(source, name: str = "cont", **sections) -> dict:
    """A tiny recipe; `sections` update its top-level keys (dicts are merged one level deep)."""
    data = {"name": name, "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
            "data": {"train": source, "seq_len": SEQ, "eval_fraction": 0.1},
            "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 0,
                      "eval_max_tokens": EVAL_TOKENS, "checkpoint_every": 0, "keep_checkpoints": 10,
                      "precision": "fp32", "schedule": {"name": "cosine", "warmup_steps": 1}}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def train(tmp: Path, name: str, data: dict) -> Path:
    return run_stage(validate_recipe(data, name), out=tmp / name, quiet=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpora) -> Path:
    """A fresh preset trained on prose: WSD, warmup 2, decay over the last 3 of 8 steps; checkpoints 5 and 8."""
    data = recipe(str(corpora["prose"]), name="base",
                  train={"max_steps": BASE_STEPS, "checkpoint_every": BRANCH_AT,
                         "schedule": {"name": "wsd", "warmup_steps": 2, "decay_fraction": DECAY / BASE_STEPS}})
    return train(tmp_path_factory.mktemp("base"), "base", data)


@pytest.fixture(scope="module")
def continued(tmp_path_factory, corpora, base) -> Path:
    """init_from the base run, trained on notes; evaluated (and checkpointed) every 2 steps."""
    data = recipe(str(corpora["notes"]), init_from=str(base),
                  train={"eval_every": 2, "checkpoint_every": 2})
    return train(tmp_path_factory.mktemp("continued"), "continued", data)


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == kind]


def evals_at(run: Path, step: int) -> dict[str, dict]:
    return {e["domain"]: e for e in events(run, "eval") if e["step"] == step}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. what a continued run carries over


def test_continuing_on_new_data_starts_a_fresh_data_stream(tmp_path, corpora, base, continued):
    """init_from = the same weights as model.path=RUN/final, and the same first batches: the old run's data
    position is never restored unless asked for (and on new data it could not even fit)."""
    from_path = train(tmp_path, "from-path", recipe(str(corpora["notes"]), model={"path": str(base / "final")}))
    losses = train_losses(continued / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == train_losses(from_path / "metrics.jsonl")  # bit for bit: same weights, same batches
    assert events(continued, "train")[0]["source_tokens"] == {"notes": 4 * SEQ}  # counted from this run's step 0

    (init,) = events(continued, "init")
    assert init["carried"] == ["weights"]
    assert "data position" in init["reset"] and "optimizer moments" in init["reset"]
    assert any(r.startswith("step counter") for r in init["reset"]) and any("LR schedule" in r for r in init["reset"])
    assert init["from"] == str(base / "final") and init["run"] == str(base)
    assert init["checkpoint_step"] == BASE_STEPS  # the newest checkpoint, the one the optimizer would come from
    (init,) = events(from_path, "init")  # model.path: weights only, there is no run state to carry
    assert init["carried"] == ["weights"] and init["checkpoint"] is None and init["run"] is None

    # init_optimizer: the base's AdamW moments (and step count) continue. The first loss is computed before
    # any update, so it is the same; every later one differs.
    moments = train(tmp_path, "moments", recipe(str(corpora["notes"]), init_from=str(base), init_optimizer=True))
    (init,) = events(moments, "init")
    assert init["carried"] == ["weights", "optimizer moments"] and "data position" in init["reset"]
    with_moments = train_losses(moments / "metrics.jsonl")
    assert with_moments[1] == losses[1]
    assert all(with_moments[s] != losses[s] for s in (2, 3, 4)), (with_moments, losses)


def test_init_optimizer_carries_the_moments_a_lisa_run_kept_into_full_training(tmp_path, corpora, base):
    """LISA keeps moments only for the layers trainable at its last step: a full fine-tune continuing it
    gets those, by name, and starts the other tensors' moments fresh (its own lr and weight decay)."""
    from tunelab import models

    notes = str(corpora["notes"])
    lisa = train(tmp_path, "lisa", recipe(notes, init_from=str(base),
                                          method={"name": "lisa", "options": {"gamma": 1, "interval": 2}}))
    saved = torch.load(lisa / "checkpoints" / "step-4" / "optimizer.pt", weights_only=True)
    kept = {n for g in saved["param_groups"] for n, i in zip(g["param_names"], g["params"]) if i in saved["state"]}
    full = train(tmp_path, "full", recipe(notes, init_from=str(lisa), init_optimizer=True,
                                          train={"max_steps": 2, "weight_decay": 0.0}))
    (carried,) = events(full, "init_optimizer")
    tensors = len(list(models.load_model(str(full / "final")).named_parameters()))  # all of them train now
    assert (carried["carried"], carried["fresh"]) == (len(kept), tensors - len(kept))
    assert 0 < len(kept) < tensors
    (init,) = events(full, "init")
    assert "optimizer moments" in init["carried"]


def test_continuing_on_the_same_data_restores_its_position_only_when_asked(tmp_path, corpora, base):
    prose = str(corpora["prose"])
    fresh = train(tmp_path, "fresh", recipe(prose, init_from=str(base), train={"max_steps": 2}))
    from_path = train(tmp_path, "path", recipe(prose, model={"path": str(base / "final")}, train={"max_steps": 2}))
    assert train_losses(fresh / "metrics.jsonl") == train_losses(from_path / "metrics.jsonl")
    assert events(fresh, "train")[0]["source_tokens"] == {"prose": 4 * SEQ}

    carried = train(tmp_path, "carried", recipe(prose, init_from=str(base), init_data_state=True,
                                                train={"max_steps": 2}))
    (init,) = events(carried, "init")
    assert init["carried"] == ["weights", "data position"] and "optimizer moments" in init["reset"]
    # The stream goes on after the base's 8 steps of 4 sequences: other batches, another first loss.
    assert events(carried, "train")[0]["source_tokens"] == {"prose": (BASE_STEPS + 1) * 4 * SEQ}
    assert train_losses(carried / "metrics.jsonl")[1] != train_losses(fresh / "metrics.jsonl")[1]


# ---------------------------------------------------------------- 2. replay


def test_replay_mixes_the_ancestors_held_out_split_at_the_fraction(tmp_path, corpora, base):
    f = 0.1
    data = recipe(str(corpora["notes"]), init_from=str(base), data={"eval_fraction": 0.05, "replay": {"fraction": f}},
                  train={"max_steps": 10, "micro_batch_size": 4, "grad_accum": 2, "eval_at_start": False})
    run = train(tmp_path, "replay", data)

    steps = events(run, "train")
    assert [e["step"] for e in steps] == list(range(1, 11))
    for e in steps:
        tokens = e["source_tokens"]
        assert set(tokens) == {"notes", "prose"} and sum(tokens.values()) == e["tokens"] == e["step"] * 8 * SEQ
        replayed = tokens["prose"] // SEQ
        assert abs(replayed - f * 8 * e["step"]) <= 1, (e["step"], tokens)  # within one sequence, cumulatively

    lineage = json.loads((run / "lineage.json").read_text())
    target, replay = lineage["data"]
    assert (target["domain"], target["role"], target["eval_fraction"]) == ("notes", "train", 0.05)
    assert replay["source"] == str(corpora["prose"]) and replay["role"] == "replay"
    assert replay["eval_fraction"] == 0.1  # the ancestor's, not this run's 0.05
    (ancestor,) = json.loads((base / "lineage.json").read_text())["data"]
    # The very split the base used: replay trains only on what the base trained on, never on its eval text.
    assert (replay["train_tokens"], replay["eval_tokens"], replay["content_hash"]) == \
        (ancestor["train_tokens"], ancestor["eval_tokens"], ancestor["content_hash"])

    final = evals_at(run, 10)
    assert {d: e["role"] for d, e in final.items()} == {"notes": "target", "prose": "reference"}
    assert not evals_at(run, 0)  # eval_at_start: false is honoured for a continued run


def test_replay_of_explicit_sources(tmp_path, corpora, base):
    """Named replay sources, two of them, weighted 1 : 3 inside the replay share."""
    data = recipe(str(corpora["notes"]), init_from=str(base),
                  data={"replay": {"sources": [str(corpora["prose"]), {"source": str(corpora["extra"]), "weight": 3}],
                                   "fraction": 0.5}},
                  train={"max_steps": 4, "micro_batch_size": 8, "eval_at_start": False})
    run = train(tmp_path, "replay2", data)
    tokens = events(run, "train")[-1]["source_tokens"]
    counts = {d: n // SEQ for d, n in tokens.items()}  # 32 sequences: 1/2 notes, 1/8 prose, 3/8 extra
    assert counts.keys() == {"notes", "prose", "extra"} and sum(counts.values()) == 32
    assert all(abs(counts[d] - share * 32) <= 1 for d, share in (("notes", 0.5), ("prose", 0.125), ("extra", 0.375)))
    roles = {d["domain"]: d["role"] for d in json.loads((run / "lineage.json").read_text())["data"]}
    assert roles == {"notes": "train", "prose": "replay", "extra": "replay"}


# ---------------------------------------------------------------- 3. forgetting, logged vs measured


def _cli_eval(model_dir: Path, corpora) -> dict:
    result = run_cli("eval", str(model_dir), "--data", str(corpora["prose"]), "--data", str(corpora["notes"]),
                     "--json", "--max-tokens", str(EVAL_TOKENS), "--seq-len", str(SEQ))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _assert_matches(logged: dict, measured: dict) -> None:
    assert logged.keys() == measured.keys() == {"prose", "notes"}
    for domain in logged:
        assert measured[domain]["split"] == "held-out", domain
        assert measured[domain]["eval_tokens"] == logged[domain]["eval_tokens"] > 0, domain
        assert abs(measured[domain]["loss"] - logged[domain]["loss"]) <= 1e-5, domain
        assert measured[domain]["bpb"] == pytest.approx(logged[domain]["bpb"], abs=1e-5), domain


def test_logged_forgetting_equals_an_independent_eval(corpora, base, continued):
    from tunelab.commands.evaluate import evaluate_model

    config = yaml.safe_load((continued / "config.yaml").read_text())
    assert config["data"]["eval"] == [] and config["data"]["eval_ancestors"] is True
    assert config["train"]["eval_at_start"] is True  # resolved: the run starts from a trained model
    by_step = {s: evals_at(continued, s) for s in (0, 2, 4)}
    assert sorted({e["step"] for e in events(continued, "eval")}) == [0, 2, 4]
    for step, logged in by_step.items():
        # prose is scored although not in data.eval: the base trained on it (its held-out split).
        assert {d: e["role"] for d, e in logged.items()} == {"notes": "target", "prose": "reference"}, step
        for domain, e in logged.items():
            start = by_step[0][domain]
            assert e["delta_from_start"] == e["loss"] - start["loss"], (step, domain)
            assert e["bpb_delta_from_start"] == e["bpb"] - start["bpb"], (step, domain)
            assert e["tokens"] == step * 4 * SEQ
    assert all(e["delta_from_start"] == 0.0 for e in by_step[0].values())
    assert by_step[4]["notes"]["delta_from_start"] < 0  # it learns the new domain

    # Step 2: the checkpoint, scored by `tunelab eval` (auto split: the run and its ancestor trained on both).
    _assert_matches(by_step[2], _cli_eval(continued / "checkpoints" / "step-2", corpora))
    # Step 0 is the starting model itself, both domains on their held-out split (notes: the split this run
    # holds out, with the same eval_fraction as the base's recipe); step 4 is final/ (the same code, in process).
    sources = [str(corpora["prose"]), str(corpora["notes"])]
    _assert_matches(by_step[0], evaluate_model(str(base / "final"), sources, seq_len=SEQ, max_tokens=EVAL_TOKENS,
                                               split="held-out", log=lambda *a: None))
    _assert_matches(by_step[4], evaluate_model(str(continued / "final"), sources, seq_len=SEQ, max_tokens=EVAL_TOKENS,
                                               log=lambda *a: None))


def test_eval_ancestors_false_scores_only_this_runs_domains(tmp_path, corpora, base):
    run = train(tmp_path, "no-ancestors", recipe(str(corpora["notes"]), init_from=str(base),
                                                 data={"eval_ancestors": False}, train={"max_steps": 1}))
    assert sorted((e["step"], e["domain"], e["role"]) for e in events(run, "eval")) == \
        [(0, "notes", "target"), (1, "notes", "target")]
    assert json.loads((run / "lineage.json").read_text())["eval_data"] == []


# ---------------------------------------------------------------- 7. the step-0 baseline


def test_eval_at_start_only_for_a_trained_start_and_the_baseline_survives_resume(tmp_path, base, continued):
    assert yaml.safe_load((base / "config.yaml").read_text())["train"]["eval_at_start"] is False
    assert not evals_at(base, 0)  # a fresh preset has nothing to measure from
    assert all("delta_from_start" not in e for e in events(base, "eval"))

    start = evals_at(continued, 0)
    saved = json.loads((continued / "checkpoints" / "step-2" / "state.json").read_text())["eval_start"]
    assert saved == {d: {"loss": e["loss"], "bpb": e["bpb"]} for d, e in start.items()}

    # Cut the run back to its step-2 checkpoint and resume: the baseline comes from the checkpoint, not from
    # a new step-0 evaluation (of weights that have moved), so the deltas come out the same.
    cut = tmp_path / "cut"
    shutil.copytree(continued, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    torch.manual_seed(4321)
    run_stage(load_recipe(cut / "config.yaml"), out=cut, resume=True, quiet=True)
    raw = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in raw if e["event"] == "resume"] == [2]
    assert sum(e["event"] == "eval" and e["step"] == 0 for e in raw) == 2  # only the original ones
    assert len(events(cut, "init")) == 1
    again, original = evals_at(cut, 4), evals_at(continued, 4)
    for domain in original:
        assert again[domain]["loss"] == original[domain]["loss"]
        assert again[domain]["delta_from_start"] == original[domain]["delta_from_start"] == \
            again[domain]["loss"] - start[domain]["loss"]


# ---------------------------------------------------------------- 4. exact resume of a replay run


@pytest.mark.slow
def test_replay_run_with_a_mixture_switch_resumes_exactly_after_sigkill(tmp_path, corpora, base):
    steps, switch = 60, 45
    data = recipe([str(corpora["notes"]), str(corpora["extra"])], init_from=str(base),
                  data={"replay": {"fraction": 0.25}, "mixture_schedule": [{"at": switch / steps, "weights": {"extra": 3}}]},
                  train={"max_steps": steps, "checkpoint_every": 4, "keep_checkpoints": 3, "eval_every": 20})
    path = tmp_path / "replay.yaml"
    path.write_text(yaml.safe_dump(data))
    reference = run_stage(load_recipe(path), out=tmp_path / "ref", quiet=True)

    out = tmp_path / "killed"
    killed_at = run_and_sigkill("pretrain", path, out, 5)
    assert killed_at < switch, "killed after the mixture switch: nothing left to test"
    resumed = run_cli("pretrain", str(path), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resume,) = events(out, "resume")
    assert 4 <= resume["step"] < switch

    expected, got = train_losses(reference / "metrics.jsonl"), train_losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1)) and got == expected  # bit for bit
    assert_same_weights(reference / "final", out / "final")
    ref_train = {e["step"]: e["source_tokens"] for e in events(reference, "train")}
    assert {e["step"]: e["source_tokens"] for e in events(out, "train")} == ref_train

    # The data plan, recomputed by hand: replay 1/4 of every batch of 4, notes : extra 1 : 1 until step 45
    # (round(0.75 * 60)), 1 : 3 from then on, drawn by a Mixture over the runs' own sequence counts.
    from tunelab.data import Mixture

    lineage = json.loads((reference / "lineage.json").read_text())["data"]
    assert [(d["domain"], d["role"]) for d in lineage] == [("notes", "train"), ("extra", "train"), ("prose", "replay")]
    mixture = Mixture([d["train_tokens"] // SEQ for d in lineage], [0.375, 0.375, 0.25], seed=0)
    drawn = {}
    for step in range(steps):
        if step == switch:
            mixture.set_weights([0.75 / 4, 0.75 * 3 / 4, 0.25])
        mixture.take(4)
        drawn[step + 1] = {d["domain"]: n * SEQ for d, n in zip(lineage, mixture.drawn)}
    assert ref_train == drawn

    # The baseline survives the kill: the one step-0 evaluation (logged before the kill), every delta from it.
    raw = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sum(e["event"] == "eval" and e["step"] == 0 for e in raw) == 3  # notes, extra, prose: once each
    start = evals_at(out, 0)
    assert {d: e["loss"] for d, e in start.items()} == {d: e["loss"] for d, e in evals_at(reference, 0).items()}
    for e in events(out, "eval"):
        assert e["delta_from_start"] == e["loss"] - start[e["domain"]]["loss"]
    ref_evals = {(e["step"], e["domain"]): (e["loss"], e["delta_from_start"], e["role"]) for e in events(reference, "eval")}
    assert {(e["step"], e["domain"]): (e["loss"], e["delta_from_start"], e["role"]) for e in events(out, "eval")} == ref_evals
    assert {d for _, d in ref_evals} == {"notes", "extra", "prose"}


# ---------------------------------------------------------------- 5. anneal branches


def test_anneal_branch_equals_the_parents_wsd_decay_bit_for_bit(base):
    result = run_cli("anneal", str(base), "--from", f"step-{BRANCH_AT}", "--steps", str(DECAY), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    branch = base.parent / f"base-anneal-{BRANCH_AT}"  # the default: beside the run
    assert_same_weights(base / "final", branch / "final")

    parent = {e["step"]: e for e in events(base, "train")}
    got = {e["step"]: e for e in events(branch, "train")}
    assert sorted(got) == list(range(1, DECAY + 1))
    cfg = yaml.safe_load((branch / "config.yaml").read_text())
    lr, floor = cfg["train"]["lr"], cfg["train"]["schedule"]["min_lr_ratio"]
    for j in got:
        assert got[j]["loss"] == parent[BRANCH_AT + j]["loss"], j
        assert got[j]["lr"] == parent[BRANCH_AT + j]["lr"], j
        # linear from the plateau (1.0) to the floor, the last step on the floor
        assert got[j]["lr"] == pytest.approx(lr * (floor + (1 - floor) * (1 - j / DECAY)), rel=1e-12), j
    assert got[DECAY]["lr"] == pytest.approx(lr * floor, rel=1e-12)

    assert cfg["init_from"] == str(base / "checkpoints" / f"step-{BRANCH_AT}")
    assert cfg["init_optimizer"] is True and cfg["init_data_state"] is True
    assert cfg["train"]["schedule"]["name"] == "anneal" and cfg["train"]["schedule"]["start_ratio"] == 1.0
    (init,) = events(branch, "init")
    assert init["carried"] == ["weights", "optimizer moments", "data position"]
    assert init["checkpoint_step"] == BRANCH_AT
    start = evals_at(branch, 0)  # the branch point itself is the baseline
    assert start and all(e["delta_from_start"] == 0.0 for e in start.values())


def test_anneal_recipe_starts_from_the_parents_lr_and_notes_a_decaying_branch_point(base):
    from tunelab.commands.anneal import anneal_recipe
    from tunelab.config import ScheduleConfig
    from tunelab.train.schedules import lr_multiplier

    notes: list[str] = []
    cfg, out = anneal_recipe(base, str(base / "checkpoints" / f"step-{BASE_STEPS}"), 4, shape="sqrt", log=notes.append)
    parent = ScheduleConfig(**yaml.safe_load((base / "config.yaml").read_text())["train"]["schedule"])
    assert cfg.train.schedule.start_ratio == lr_multiplier(BASE_STEPS - 1, BASE_STEPS, parent) == parent.min_lr_ratio
    assert cfg.train.schedule.decay_shape == "sqrt" and cfg.train.max_steps == 4
    assert out == base.parent / f"base-anneal-{BASE_STEPS}"
    assert len(notes) == 1 and "'decay' phase" in notes[0]
    notes.clear()
    cfg, _ = anneal_recipe(base, "5", 4, log=notes.append)
    assert cfg.train.schedule.start_ratio == 1.0 and cfg.train.schedule.decay_shape == "linear" and not notes


@pytest.mark.slow
def test_anneal_resumes_exactly_after_sigkill(tmp_path, base):
    from tunelab.commands.anneal import run_anneal
    from tunelab.train.schedules import DECAY_SHAPES

    n = 40
    args = ["--from", f"step-{BRANCH_AT}", "--steps", str(n), "--shape", "sqrt", "--set", "train.checkpoint_every=4"]
    reference = run_anneal(base, f"step-{BRANCH_AT}", n, shape="sqrt", out=tmp_path / "ref",
                           overrides=["train.checkpoint_every=4"], quiet=True)
    out = tmp_path / "killed"
    assert run_and_sigkill("anneal", base, out, 5, *args) < n, "killed too late to test anything"
    resumed = run_cli("anneal", str(base), *args, "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in events(out, "resume")][0] >= 4

    expected, got = train_losses(reference / "metrics.jsonl"), train_losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, n + 1)) and got == expected
    assert_same_weights(reference / "final", out / "final")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    lr, floor = cfg["train"]["lr"], cfg["train"]["schedule"]["min_lr_ratio"]
    for e in events(out, "train"):  # sqrt shape: floor + (1 - floor) * (1 - sqrt(step / n))
        assert e["lr"] == pytest.approx(lr * (floor + (1 - floor) * DECAY_SHAPES["sqrt"](e["step"] / n)), rel=1e-12)
        assert e["lr"] == pytest.approx(lr * (floor + (1 - floor) * (1 - math.sqrt(e["step"] / n))), rel=1e-12)


def test_a_branch_resumed_before_its_first_checkpoint_still_carries_its_state(tmp_path, base):
    """Killed before its first checkpoint, a resumed branch starts over from step 0: with the carried optimizer
    moments and data position again, not fresh ones."""
    from tunelab.commands.anneal import run_anneal

    overrides = ["train.checkpoint_every=2"]
    reference = run_anneal(base, f"step-{BRANCH_AT}", DECAY, out=tmp_path / "ref", overrides=overrides, quiet=True)
    cut = tmp_path / "cut"  # killed before its first checkpoint: config.yaml and metrics, no checkpoints
    shutil.copytree(reference, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints")
    run_anneal(base, f"step-{BRANCH_AT}", DECAY, out=cut, overrides=overrides, resume=True, quiet=True)
    assert train_losses(cut / "metrics.jsonl") == train_losses(reference / "metrics.jsonl")
    assert_same_weights(reference / "final", cut / "final")


def test_anneal_from_a_checkpoint_that_is_not_kept_fails_in_one_line(base):
    before = tree_digest(base)
    result = run_cli("anneal", str(base), "--from", "step-999", "--steps", "3")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error:")
    assert "step-999" in message and "step-5, step-8" in message  # names the checkpoints that are kept
    assert not (base.parent / "base-anneal-999").exists()
    assert tree_digest(base) == before


# ---------------------------------------------------------------- 6. bad input: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, base):
    """Things the bad recipes point at: a plain folder, a model without lineage, a bigger tokenizer, a tiny file."""
    from tunelab import tokenizers

    root = tmp_path_factory.mktemp("bad")
    (root / "plain").mkdir()
    (root / "plain" / "readme.txt").write_text("not a run\n")
    shutil.copytree(base / "final", root / "orphan" / "model")  # no lineage.json anywhere near it
    tok = tokenizers.load_tokenizer(str(base / "final"))
    tok.add_tokens([f"newtoken{i}" for i in range(7)])
    tok.save_pretrained(root / "bigger-tok")
    (root / "tiny.txt").write_text("A few words.\n")
    return root


BAD = {  # name -> (recipe changes, words the one-line error must contain)
    "init_from missing": (lambda c, b, r: {"init_from": str(r / "nowhere")}, ["init_from", "does not exist"]),
    "init_from not a run": (lambda c, b, r: {"init_from": str(r / "plain")}, ["init_from", "not a tunelab run",
                                                                               "model.path"]),
    "init_from and model.path": (lambda c, b, r: {"init_from": str(b), "model": {"path": str(b / "final")}},
                                 ["init_from", "model.path", "not both"]),
    "init_optimizer alone": (lambda c, b, r: {"init_optimizer": True}, ["init_optimizer", "init_from"]),
    "tokenizer too big": (lambda c, b, r: {"init_from": str(b), "tokenizer": {"path": str(r / "bigger-tok")}},
                          ["tokenizer has", "embedding has", "rows"]),
    "replay gives no tokens": (lambda c, b, r: {"init_from": str(b),
                                                "data": {"replay": {"sources": [str(r / "tiny.txt")]}}},
                               ["tiny.txt", "replay tokens", "data.seq_len"]),
    "replay without lineage": (lambda c, b, r: {"model": {"path": str(r / "orphan" / "model")},
                                                "data": {"replay": {"fraction": 0.1}}},
                               ["data.replay.sources", "no old data"]),
    "multi_wsd periods": (lambda c, b, r: {"train": {"max_steps": 10, "schedule": {"name": "multi_wsd",
                                                                                  "periods": [4, 5]}}},
                          ["train.schedule.periods", "4+5 = 9", "(10)"]),
    "infinite phases too long": (lambda c, b, r: {"train": {"max_steps": 10, "schedule": {
        "name": "infinite", "warmup_steps": 3, "cooldown_steps": 5, "anneal_steps": 4}}}, ["= 12 steps", "(10)"]),
    "mixture unknown domain": (lambda c, b, r: {"data": {"mixture_schedule": [{"at": 0.5, "weights": {"nots": 2}}]}},
                               ["data.mixture_schedule.0.weights", "'nots'", "did you mean 'notes'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, corpora, base, continued, bad_inputs, case):
    changes, words = BAD[case]
    data = recipe(str(corpora["notes"]), name="bad")
    for key, value in changes(corpora, base, bad_inputs).items():
        if key == "data":
            value = {**data["data"], **value}
        elif key == "train":
            value = {**data["train"], **value}
        data[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    before = {run: tree_digest(run) for run in (base, continued)}

    out = tmp_path / "out"
    result = run_cli("pretrain", str(path), "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error:"), message
    for word in words:
        assert word in message, (word, message)
    # Nothing written: at most an empty directory, never a run (so a fixed recipe can use the same --out).
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert {run: tree_digest(run) for run in (base, continued)} == before


def test_an_existing_run_is_never_overwritten_by_a_continued_run(tmp_path, corpora, base, continued):
    before = tree_digest(continued)
    data = recipe(str(corpora["notes"]), init_from=str(base))
    with pytest.raises(Exception) as err:
        run_stage(validate_recipe(data, "again"), out=continued, quiet=True)
    assert "already holds a run" in str(err.value)
    assert tree_digest(continued) == before


def test_carrying_a_data_state_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, corpora, base):
    from tunelab.errors import RunDirError

    data = recipe(str(corpora["notes"]), init_from=str(base), init_data_state=True)
    with pytest.raises(RunDirError) as err:
        run_stage(validate_recipe(data, "misfit"), out=tmp_path / "misfit", quiet=True)
    message = str(err.value)
    assert "\n" not in message and "init_data_state: false" in message and "does not fit" in message
    # Following the advice, into the same directory:
    data["init_data_state"] = False
    run_stage(validate_recipe(data, "misfit"), out=tmp_path / "misfit", quiet=True)
    assert sorted(train_losses(tmp_path / "misfit" / "metrics.jsonl")) == [1, 2, 3, 4]
