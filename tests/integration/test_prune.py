"""`tunelab prune` on a tiny trained model: magnitude and Wanda give plain HF models with exact sparsity, masks,
a report and lineage; `method: masked` keeps the zeros through later training (`full` warns and fills them);
lottery tickets rewind to exactly the saved weights; bad input is a one-line error with nothing written; a
pipeline prunes and recovers; structured pruning through the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, write_corpus
from tunelab.config import RECIPES_DIR
from tunelab.ops import prune
from tunelab.runs import train_losses, weight_files_sha256
from tunelab.stages.prune import cli_recipe, run_prune

# Small evaluation and calibration windows: llama-micro, a 32-token training sequence, a tiny corpus.
SMALL = ["eval.seq_len=32", "eval.max_tokens=256", "calibration.seq_len=32", "calibration.max_tokens=512"]
TRAIN = {"micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "precision": "fp32", "eval_max_tokens": 128,
         "eval_every": 0}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _train(recipe: Path, out: Path, quiet: bool = True) -> Path:
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    return run_stage(load_recipe(str(recipe)), out=out, quiet=quiet)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """llama-micro pretrained for 4 steps on a written corpus (its own 384-token BPE)."""
    root = tmp_path_factory.mktemp("prune")
    corpus = write_corpus(root / "corpus", n_docs=30, seed=2)
    recipe = _write(root / "base.yaml", {
        "name": "base", "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 100_000},
        "data": {"train": str(corpus), "seq_len": 32}, "train": {**TRAIN, "max_steps": 4}})
    run = _train(recipe, root / "base")
    return {"root": root, "run": run, "final": run / "final", "corpus": corpus}


def _cli(*args) -> tuple[int, str, str]:
    """`tunelab ARGS` in this process (a subprocess costs seconds of imports): exit code, stdout, stderr."""
    import contextlib
    import io

    from tunelab.commands import cli

    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["tunelab", *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, stdout.getvalue(), stderr.getvalue()


def _sets(*extra: str) -> list[str]:
    return [a for s in (*SMALL, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def magnitude(base):
    """`tunelab prune BASE --method magnitude --sparsity 0.5`: base pruned to 50% per matrix."""
    out = base["root"] / "magnitude"
    code, stdout, stderr = _cli("prune", base["run"], "--method", "magnitude", "--sparsity", "0.5", *_sets(),
                                "--out", out)
    assert code == 0, stderr
    return {"dir": out, "stdout": stdout, "stderr": stderr}


@pytest.fixture(scope="module")
def magnitude_dir(magnitude) -> Path:
    return magnitude["dir"]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights in a model directory's model.safetensors. A checkpoint stores the tied embedding under
    lm_head.weight, save_pretrained under model.embed_tokens.weight: named the latter way here."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(model_dir) / "model.safetensors"))
    if "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    return tensors


def _prunable_names(model_dir: Path) -> list[str]:
    from tunelab import models

    return list(prune.prunable_params(models.load_model(str(model_dir))))


def _check_pruned_dir(out: Path, parent: Path, sparsity: float, method: str, per_row: bool = False) -> dict:
    """The checks every unstructured prune output passes; returns its masks."""
    from transformers import AutoModelForCausalLM

    # Plain transformers loads it; its weights are the saved ones.
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    saved, before = _tensors(out), _tensors(parent)
    state = hf.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor([[1, 2, 3, 4, 5]])).logits).all()

    # Exactly `sparsity` of each prunable matrix is 0 (per row for Wanda), the zeros are the masks, the kept
    # weights and everything else are the parent's, bit for bit.
    masks = prune.load_masks(out)
    names = _prunable_names(parent)
    assert sorted(masks) == sorted(names) and saved.keys() == before.keys()
    for name, tensor in saved.items():
        if name not in masks:
            assert torch.equal(tensor, before[name]), name
            continue
        mask = masks[name]
        assert mask.dtype == torch.bool and mask.shape == tensor.shape
        groups = mask.reshape(mask.shape[0], -1) if per_row else mask.reshape(1, -1)
        assert [int((~g).sum()) for g in groups] == [round(sparsity * groups.shape[1])] * groups.shape[0], name
        assert torch.equal(tensor == 0, ~mask), name  # the trained parent has no zeros of its own
        assert torch.equal(tensor[mask], before[name][mask]), name

    record = json.loads((out / "prune.json").read_text())
    assert record["method"] == method and record["model"] == str(parent.resolve())
    report = record["sparsity"]
    assert [r["name"] for r in report["matrices"]] == names
    for row in report["matrices"]:
        assert row["zeros"] == row["pruned"] == int((~masks[row["name"]]).sum()) and row["pruned_nonzero"] == 0
        assert row["sparsity"] == pytest.approx(sparsity)
    n_pruned = sum(int((~m).sum()) for m in masks.values())
    assert report["sparsity"] == pytest.approx(sparsity) and report["pruned_zeros"] == n_pruned
    size = record["size"]
    assert size["before"]["params"] == size["after"]["params"] == sum(t.numel() for t in saved.values())
    assert size["before"]["nonzero_params"] - size["after"]["nonzero_params"] == n_pruned
    assert size["after"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert "forward_tokens_per_s" not in size["before"]  # zeros in dense weights compute the same: not timed
    scores = record["eval"]  # scored on the held-out split the parent trained with (data.eval_fraction 0.02)
    assert scores["splits"] == {"corpus": {"split": "held-out", "eval_fraction": 0.02}}
    assert scores["before"].keys() == scores["after"].keys() == {"corpus"}
    assert all(s["loss"] > 0 and s["eval_tokens"] > 0 for s in (scores["before"]["corpus"], scores["after"]["corpus"]))

    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["name"], lineage["stage"]) == (out.name, "prune")
    assert lineage["parents"] == [{"role": "pruned-from", "path": str(parent.resolve()), "label": "base",
                                   "weights_sha256": weight_files_sha256(parent)}]
    assert lineage["method"]["name"] == method and lineage["method"]["sparsity"] == sparsity
    return masks


def test_cli_magnitude_prune_is_a_plain_hf_model_with_exact_sparsity(base, magnitude):
    out, stderr = magnitude["dir"], magnitude["stderr"]
    assert magnitude["stdout"].strip() == str(out)
    assert "pruned matrices" in stderr and "held-out loss, lower is better" in stderr and "Traceback" not in stderr
    assert "tokens/s" not in stderr
    masks = _check_pruned_dir(out, base["final"], 0.5, "magnitude")
    # `tunelab eval` scores the same text: the parent's and the pruned model's loss are the table's.
    from tunelab.commands.evaluate import evaluate_model

    scores = json.loads((out / "prune.json").read_text())["eval"]
    for model, when in ((base["final"], "before"), (out, "after")):
        (scored,) = evaluate_model(str(model), [str(base["corpus"])], seq_len=32, max_tokens=256,
                                   log=lambda *a: None).values()
        assert (scored["split"], scored["eval_fraction"]) == ("held-out", 0.02)
        assert scored["loss"] == pytest.approx(scores[when]["corpus"]["loss"], rel=1e-6)
    # The pruned ones are the smallest |w| of each matrix.
    before = _tensors(base["final"])
    for name, mask in masks.items():
        w = before[name].abs()
        assert w[~mask].max() <= w[mask].min(), name
    assert json.loads((out / "lineage.json").read_text())["method"]["scope"] == "layer"


def test_wanda_prune_recomputes_from_its_calibration_text(base, tmp_path):
    from tunelab import models, tokenizers
    from tunelab.stages.prune import calibration_batches

    out = tmp_path / "wanda"
    code, stdout, stderr = _cli("prune", base["run"], "--method", "wanda", "--sparsity", "0.5",
                                 *_sets(), "--out", out)
    assert code == 0 and stdout.strip() == str(out), stderr
    assert "calibration: 16 windows of 32 tokens" in stderr and "(training split)" in stderr
    masks = _check_pruned_dir(out, base["final"], 0.5, "wanda", per_row=True)
    assert json.loads((out / "lineage.json").read_text())["method"]["scope"] == "row"

    # The masks are Wanda's |W|·‖x‖ per row on the default calibration text: what the model trained on.
    cfg = cli_recipe(str(base["run"]), method="wanda", sparsity=0.5, overrides=SMALL)
    model = models.load_model(str(base["final"])).eval()
    batches = calibration_batches(cfg, model, tokenizers.load_tokenizer(str(base["final"])), base["final"],
                                  lambda *a: None)
    params = prune.prunable_params(model)
    expected = prune.masks_from_scores(prune.wanda_scores(model, params, batches), 0.5, "row")
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    by_magnitude = prune.masks_from_scores(prune.magnitude_scores(params), 0.5, "row")
    assert any(not torch.equal(masks[k], by_magnitude[k]) for k in masks)  # the inputs' norms matter


def test_pruning_a_pruned_model_keeps_its_zeros(magnitude_dir, tmp_path):
    out = run_prune(cli_recipe(str(magnitude_dir), sparsity=0.75, overrides=SMALL + ["eval.data=[]"],
                               name="further"), out=tmp_path / "further", quiet=True)
    first, second = prune.load_masks(magnitude_dir), prune.load_masks(out)
    weights = _tensors(out)
    assert second.keys() == first.keys()
    for name, mask in second.items():
        assert not (mask & ~first[name]).any(), name  # pruned before: still pruned
        assert int((~mask).sum()) == round(0.75 * mask.numel()), name
        assert torch.equal(weights[name] == 0, ~mask), name
    assert "eval" not in json.loads((out / "prune.json").read_text())  # eval.data: [] scores nothing


# ---------------------------------------------------------------- training a pruned model


def _recovery_recipe(path: Path, base: dict, start: Path, method: str) -> Path:
    return _write(path, {"kind": "finetune", "name": path.stem, "model": {"path": str(start)},
                         "data": {"train": str(base["corpus"]), "seq_len": 32}, "method": {"name": method},
                         "train": {**TRAIN, "max_steps": 4, "lr": 1e-2, "checkpoint_every": 2,
                                   "schedule": {"name": "constant"}}})


def test_masked_training_keeps_every_pruned_weight_at_zero(base, magnitude_dir, tmp_path):
    from safetensors.torch import load_file

    from tunelab import models

    run = _train(_recovery_recipe(tmp_path / "masked.yaml", base, magnitude_dir, "masked"), tmp_path / "masked")
    masks = prune.load_masks(magnitude_dir)
    start, final = _tensors(magnitude_dir), _tensors(run / "final")
    for name, mask in masks.items():
        assert torch.all(final[name][~mask] == 0), f"{name}: a pruned weight moved"
        assert not torch.equal(final[name][mask], start[name][mask]), f"{name}: the kept weights did not train"
    saved = prune.load_masks(run / "final")  # beside the final model, for the next stage
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)
    state = load_file(str(run / "checkpoints" / "step-2" / "method.safetensors"))  # method state in checkpoints
    assert all(torch.equal(state[f"mask:{k}"].bool(), masks[k]) for k in masks)
    losses = train_losses(run / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 5)) and losses[4] < losses[1], losses
    report = prune.sparsity_report(models.load_model(str(run / "final")), saved)
    assert report["sparsity"] == 0.5 and all(r["pruned_nonzero"] == 0 for r in report["matrices"])


def test_full_training_of_a_pruned_model_warns_and_fills_the_zeros(base, magnitude_dir, tmp_path, capsys):
    run = _train(_recovery_recipe(tmp_path / "full.yaml", base, magnitude_dir, "full"), tmp_path / "full",
                 quiet=False)
    logged = capsys.readouterr().out
    warning = [line for line in logged.splitlines()  # (the tiny corpus's held-out split is warned about too)
               if line.startswith("warning:") and "held-out split has only" not in line]
    assert warning == [f"warning: {magnitude_dir} is pruned (masks.safetensors) and method full does not keep its "
                       "pruned weights at 0; use method: masked to keep the sparsity"], logged
    masks, final = prune.load_masks(magnitude_dir), _tensors(run / "final")
    assert not (run / "final" / prune.MASKS_FILE).exists()
    for name, mask in masks.items():
        assert (final[name][~mask] != 0).all(), name  # every pruned weight trained away from 0


# ---------------------------------------------------------------- lottery tickets (method imp)


def _lottery(base: dict, root: Path, rewind: str, random_ticket: bool) -> Path:
    dense = _write(root / "dense.yaml", {
        "name": "dense", "model": {"preset": "llama-micro"}, "tokenizer": {"path": str(base["final"])},
        "data": {"train": str(base["corpus"]), "seq_len": 32}, "train": {**TRAIN, "max_steps": 4}})
    return _write(root / "lottery.yaml", {
        "kind": "prune", "name": "lottery", "method": "imp", "sparsity": 0.75,
        "lottery": {"train": str(dense), "rounds": 2, "rewind": rewind, "random_ticket": random_ticket}})


@pytest.mark.slow
@pytest.mark.parametrize("rewind,random_ticket", [("init", False), ("step-2", True)])
def test_lottery_rewinds_to_exactly_the_saved_weights(base, tmp_path, rewind, random_ticket):
    from transformers import AutoModelForCausalLM

    from tunelab.stages.lottery import round_sparsity

    recipe, out = _lottery(base, tmp_path, rewind, random_ticket), tmp_path / "out"
    code, stdout, stderr = _cli("prune", recipe, "--out", out, "--quiet")
    assert code == 0 and stdout.strip() == str(out), stderr
    rounds = out / "rounds"
    rewind_dir = rounds / "init" if rewind == "init" else rounds / "round-0" / "checkpoints" / "step-2"
    point = _tensors(rewind_dir)
    names = _prunable_names(rounds / "init")
    assert not any((point[n] == 0).any() for n in names)  # so zeros below are the masks'

    previous = None
    for r in (1, 2):
        start = rounds / f"round-{r}-start"
        masks, weights = prune.load_masks(start), _tensors(start)
        assert sorted(masks) == sorted(names) and weights.keys() == point.keys()
        target = round_sparsity(0.75, r, 2)
        for name, tensor in weights.items():
            if name in masks:  # the rewind point times the mask, bit for bit
                expected = point[name] * masks[name]
                assert torch.equal(tensor, expected) and torch.equal(tensor.view(torch.int32),
                                                                     expected.view(torch.int32)), name
                assert int((~masks[name]).sum()) == round(target * tensor.numel()), name
                if previous is not None:
                    assert not (masks[name] & ~previous[name]).any(), f"round {r}: {name} revived a weight"
                    assert (~masks[name]).sum() > (~previous[name]).sum(), name
            else:
                assert torch.equal(tensor, point[name]), name
        # Round r trained under those masks: its final weights still have them.
        final = _tensors(rounds / f"round-{r}" / "final")
        assert all(torch.all(final[n][~masks[n]] == 0) for n in names)
        # Round r's masks are magnitude pruning of round r-1's trained weights (layer scope).
        trained = _tensors(rounds / f"round-{r - 1}" / "final")
        expected = prune.masks_from_scores({n: trained[n].abs() for n in names}, target, "layer", previous)
        assert all(torch.equal(masks[n], expected[n]) for n in names), f"round {r}"
        previous = masks

    record = json.loads((out / "prune.json").read_text())
    assert [(x["round"], x["sparsity"]) for x in record["rounds"]] == [(0, 0.0), (1, 0.5), (2, 0.75)]
    assert [x["run"] for x in record["rounds"]] == [str(rounds / f"round-{r}") for r in range(3)]
    assert all(x["eval_step"] == 4 and x["train_loss"] > 0 for x in record["rounds"])
    assert record["rewind"] == rewind and record["sparsity"]["sparsity"] == pytest.approx(0.75)
    # The output is the last ticket: plain transformers loads it; masks and weights are round 2's.
    hf = AutoModelForCausalLM.from_pretrained(out)
    final = _tensors(rounds / "round-2" / "final")
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in final.items())
    assert all(torch.equal(prune.load_masks(out)[n], previous[n]) for n in names)
    lineage = json.loads((out / "lineage.json").read_text())
    assert [(p["role"], p["path"]) for p in lineage["parents"]] == [
        ("lottery-ticket", str((rounds / "round-2" / "final").resolve())), ("rewind", str(rewind_dir.resolve()))]

    if random_ticket:
        rand_masks, rand = prune.load_masks(rounds / "random-start"), _tensors(rounds / "random-start")
        for n in names:  # same count per matrix, other positions, the same rewind point
            assert int((~rand_masks[n]).sum()) == int((~previous[n]).sum()), n
            assert not torch.equal(rand_masks[n], previous[n]), n
            assert torch.equal(rand[n], point[n] * rand_masks[n]), n
        assert record["random_ticket"]["sparsity"] == 0.75 and record["random_ticket"]["eval"]
        final = _tensors(rounds / "random" / "final")
        assert all(torch.all(final[n][~rand_masks[n]] == 0) for n in names)

        # --resume on a finished lottery keeps it.
        stamp = (out / "model.safetensors").stat().st_mtime_ns
        code, _, stderr = _cli("prune", recipe, "--out", out, "--resume")
        assert code == 0 and "prune already done, kept" in stderr
        assert (out / "model.safetensors").stat().st_mtime_ns == stamp
        # Interrupted in the last round (its final/ and the random ticket not written yet): --resume finishes
        # it from the round's checkpoint and retrains the random ticket to the same weights.
        ticket, random_final = _tensors(out), _tensors(rounds / "random" / "final")
        for path in [rounds / "round-2" / "final", rounds / "random", rounds / "random-start"]:
            shutil.rmtree(path)
        for path in out.iterdir():
            if path.is_file():
                path.unlink()
        code, stdout, stderr = _cli("prune", recipe, "--out", out, "--resume", "--quiet")
        assert code == 0 and stdout.strip() == str(out), stderr
        assert _tensors(out).keys() == ticket.keys() and all(torch.equal(_tensors(out)[k], v) for k, v in ticket.items())
        again = _tensors(rounds / "random" / "final")
        assert all(torch.equal(again[k], v) for k, v in random_final.items())
        assert (out / "prune.json").is_file() and (out / "lineage.json").is_file()

        # Another sparsity, resumed on an unfinished lottery (its records gone; lineage.json, written last, marks a
        # finished operation): init and the dense round are kept, the pruned rounds run again into fresh
        # directories (stage_keys), and the earlier rounds stay as they were.
        (out / "prune.json").unlink()
        (out / "lineage.json").unlink()
        dense_stamp, round1 = (rounds / "round-0" / "metrics.jsonl").stat().st_mtime_ns, _tensors(rounds / "round-1" / "final")
        recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "sparsity": 0.6}))
        code, _, stderr = _cli("prune", recipe, "--out", out, "--resume", "--quiet")
        assert code == 0, stderr
        assert (rounds / "round-0" / "metrics.jsonl").stat().st_mtime_ns == dense_stamp
        record = json.loads((out / "prune.json").read_text())
        runs = [Path(x["run"]) for x in record["rounds"]]
        assert runs[0] == rounds / "round-0" and [p.name.split(".")[0] for p in runs[1:]] == ["round-1", "round-2"]
        assert all(p.parent == rounds and p.name != p.name.split(".")[0] for p in runs[1:])
        assert record["sparsity"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
        assert all(torch.equal(_tensors(rounds / "round-1" / "final")[k], v) for k, v in round1.items())


# ---------------------------------------------------------------- bad input


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("case", ["sparsity_one", "sparsity_negative", "unknown_method", "not_a_model",
                                  "count_with_magnitude", "imp_without_lottery"])
def test_bad_input_is_a_one_line_error_exit_2_nothing_written(base, tmp_path, case):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    model = str(base["run"])
    args, needles = {
        "sparsity_one": ([model, "--sparsity", "1.0"], ["sparsity: 1.0 is outside [0, 1)"]),
        "sparsity_negative": ([model, "--sparsity", "-0.1"], ["sparsity: -0.1 is outside [0, 1)"]),
        "unknown_method": ([model, "--method", "magnitud", "--sparsity", "0.5"],
                           ["unknown pruning method 'magnitud'", "did you mean 'magnitude'"]),
        "not_a_model": ([str(notes), "--sparsity", "0.5"], ["is not a model directory (no config.json)"]),
        "count_with_magnitude": ([model, "--method", "magnitude", "--sparsity", "0.5", "--count", "2"],
                                 ["count: method magnitude prunes single weights"]),
        "imp_without_lottery": ([model, "--method", "imp", "--sparsity", "0.5"],
                                ["lottery: method imp needs lottery.train"]),
    }[case]
    out = tmp_path / "out"
    result = run_cli("prune", *args, "--out", str(out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    _nothing_written(out)


def test_an_occupied_out_is_refused_and_kept(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = _cli("prune", base["run"], "--sparsity", "0.5", "--out", out)
    assert code == 2 and "already exists and is not empty" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- shipped recipes and kinds

PRUNE_RECIPES = sorted(p.stem for p in (RECIPES_DIR / "prunes").glob("*.yaml"))


def test_shipped_prune_recipes_validate_and_say_their_kind():
    from tunelab.stages.prune import load_prune_recipe

    assert {"prune-wanda", "prune-ffn", "lottery"} <= set(PRUNE_RECIPES)
    for name in PRUNE_RECIPES:
        shipped = yaml.safe_load((RECIPES_DIR / "prunes" / f"{name}.yaml").read_text())
        assert shipped["name"] == name and load_prune_recipe(name).name == name
        assert cli_recipe(name).method == shipped["method"]
    for name in PRUNE_RECIPES:  # as the shipped merge recipes do, so the training commands can refuse them
        assert yaml.safe_load((RECIPES_DIR / "prunes" / f"{name}.yaml").read_text()).get("kind") == "prune", name


@pytest.mark.parametrize("case", ["prune_recipe_to_pretrain", "training_recipe_to_prune", "flag_on_a_recipe"])
def test_the_wrong_command_for_a_recipe_is_a_one_line_error(case):
    args, needle = {
        "prune_recipe_to_pretrain": (["pretrain", RECIPES_DIR / "prunes" / "prune-wanda.yaml"],
                                     "this is a 'prune' recipe; run it with `tunelab prune`"),
        "training_recipe_to_prune": (["prune", "quickstart"], "this is a 'pretrain' recipe; run it with `tunelab pretrain`"),
        "flag_on_a_recipe": (["prune", "prune-wanda", "--sparsity", "0.7"],
                             "prune-wanda is a recipe: change it with --set (e.g. --set sparsity=0.7), not --sparsity"),
    }[case]
    code, _, stderr = _cli(*args)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert needle in stderr, stderr


@pytest.mark.parametrize("recipe", ["prune-wanda", "prune-ffn"])
def test_shipped_prune_recipe_at_toy_scale(base, tmp_path, recipe):
    if recipe == "prune-ffn":
        pytest.importorskip("tunelab.ops.structured")
    out = tmp_path / recipe
    code, stdout, stderr = _cli("prune", recipe, *_sets(f"model={base['run']}", f"calibration.data={base['corpus']}"),
                                "--out", out, "--quiet")
    assert code == 0 and stdout.strip() == str(out), stderr
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"]["name"] == yaml.safe_load((RECIPES_DIR / "prunes" / f"{recipe}.yaml").read_text())["method"]
    assert json.loads((out / "prune.json").read_text())["eval"]["after"]


# ---------------------------------------------------------------- a pipeline: prune, then recover


def test_pipeline_prunes_then_recovers_with_the_sparsity_kept(base, tmp_path):
    from tunelab.commands.pipeline import run_pipeline

    _write(tmp_path / "tiny.yaml", {"model": {"preset": "llama-micro"}, "tokenizer": {"path": str(base["final"])},
                                    "data": {"train": str(base["corpus"]), "seq_len": 32},
                                    "train": {**TRAIN, "max_steps": 3}})
    _write(tmp_path / "cut.yaml", {"kind": "prune", "model": "${base}", "method": "magnitude", "sparsity": 0.6,
                                   "eval": {"data": [], "seq_len": 32}})
    pipe = _write(tmp_path / "pipe.yaml", {"name": "p", "stages": [
        {"name": "base", "pretrain": "tiny.yaml"},
        {"name": "pruned", "prune": "cut.yaml"},
        {"name": "recovered", "finetune": "tiny.yaml",
         "set": {"model.path": "${pruned}", "method": {"name": "masked"}, "train.lr": 1e-2}},
    ]})
    root = tmp_path / "runs"
    outputs = run_pipeline(pipe, out=root, quiet=True)
    assert outputs["pruned"] == root / "pruned" / "final" and (outputs["pruned"] / "prune.json").is_file()
    parent = json.loads((outputs["pruned"] / "lineage.json").read_text())["parents"][0]
    assert parent["path"] == str((root / "base" / "final").resolve())
    masks = prune.load_masks(outputs["pruned"])
    assert all(int((~m).sum()) == round(0.6 * m.numel()) for m in masks.values())
    recovered, start = _tensors(outputs["recovered"]), _tensors(outputs["pruned"])
    for name, mask in masks.items():
        assert torch.all(recovered[name][~mask] == 0), name
        assert not torch.equal(recovered[name][mask], start[name][mask]), name
    kept = prune.load_masks(outputs["recovered"])
    assert all(torch.equal(kept[k], masks[k]) for k in masks)
    stamp = (outputs["pruned"] / "model.safetensors").stat().st_mtime_ns
    run_pipeline(pipe, out=root, quiet=True)  # unchanged: every stage skipped
    assert (outputs["pruned"] / "model.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- structured pruning through the CLI


def test_cli_ffn_prune_writes_a_smaller_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("tunelab.ops.structured")
    out = tmp_path / "ffn"
    code, stdout, stderr = _cli("prune", base["run"], "--method", "ffn", "--sparsity", "0.25",
                                 *_sets(), "--out", out)
    assert code == 0 and stdout.strip() == str(out), stderr
    before = json.loads((base["final"] / "config.json").read_text())["intermediate_size"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.intermediate_size == before - round(0.25 * before) == 48
    assert hf.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor([[1, 2, 3, 4]])).logits).all()
    record = json.loads((out / "prune.json").read_text())
    assert record["size"]["after"]["params"] < record["size"]["before"]["params"]
    assert record["size"]["before"]["forward_tokens_per_s"] > 0 and record["size"]["after"]["forward_tokens_per_s"] > 0
    assert "tokens/s (median of 7 interleaved runs on one batch)" in stderr
    assert not (out / prune.MASKS_FILE).exists()
    assert json.loads((out / "lineage.json").read_text())["parents"][0]["path"] == str(base["final"].resolve())


def test_cli_removing_more_layers_than_the_model_has_is_refused(base, tmp_path):
    pytest.importorskip("tunelab.ops.structured")
    out = tmp_path / "layers"
    code, stdout, stderr = _cli("prune", base["run"], "--method", "layers", "--count", "5", "--out", out)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and not stdout and "Traceback" not in stderr, stderr
    _nothing_written(out)
    assert lines and lines[-1] == "error: count: cannot remove 5 layers from a model with 2 layers; give at most 1"
    # Refused before any work: the error is the only line (not after scoring the parent's held-out loss).
    assert len(lines) == 1, stderr
