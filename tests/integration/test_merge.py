"""`tunelab merge`: two tiny trained models (and a LoRA adapter) merged into a plain HF model directory,
with lineage, the post-merge eval table, greedy soups, sweeps, the one-line CLI, pipelines, and one-line
errors for bad inputs."""

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
from tunelab.ops import merge as ops
from tunelab.runs import weight_files_sha256
from tunelab.stages.merge import cli_recipe, run_merge

EVAL = ["eval.seq_len=32", "eval.max_tokens=256"]
QUIET = {"log": lambda *a: None}


def _train(root: Path, name: str, recipe: dict) -> Path:
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return run_stage(load_recipe(str(root / f"{name}.yaml")), out=root / name, quiet=True)


@pytest.fixture(scope="module")
def family(tmp_path_factory, corpus_dir):
    """base: llama-micro pretrained on two corpora; a, b: continued on one each; lora: a LoRA adapter on base."""
    root = tmp_path_factory.mktemp("merge")
    other = write_corpus(root / "other", n_docs=24, seed=1)
    train = {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "log_every": 2, "precision": "fp32",
             "eval_max_tokens": 128}
    base = _train(root, "base", {"model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
                                 "data": {"train": [str(corpus_dir), str(other)], "seq_len": 32},
                                 "train": {**train, "max_steps": 6}})
    a = _train(root, "a", {"init_from": str(base), "data": {"train": str(corpus_dir), "seq_len": 32}, "train": train})
    b = _train(root, "b", {"init_from": str(base), "data": {"train": str(other), "seq_len": 32}, "train": train})
    lora = _train(root, "lora", {"kind": "finetune", "model": {"path": str(base / "final")},
                                 "method": {"name": "lora", "options": {"r": 4, "alpha": 8}},
                                 "data": {"train": str(corpus_dir), "seq_len": 32}, "train": {**train, "max_steps": 3}})
    assert (lora / "final" / "adapter_config.json").is_file()
    return {"root": root, "base": base, "a": a, "b": b, "lora": lora, "A": str(corpus_dir), "B": str(other)}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _merge(args: list[str], out: Path, **kw) -> Path:
    sets = kw.pop("set", [])
    return run_merge(cli_recipe([str(a) for a in args], overrides=EVAL + sets, name=out.name, **kw), out=out, **QUIET)


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_ties_merge_is_a_plain_hf_model_with_lineage_and_an_eval_table(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, logged = tmp_path / "ties", []
    cfg = cli_recipe([str(family["a"]), str(family["b"])], method="ties", base=str(family["base"]), density=0.5,
                     data=[family["A"], family["B"]], overrides=EVAL, name="ties")
    assert run_merge(cfg, out=out, log=logged.append) == out
    finals = {k: family[k] / "final" for k in ("a", "b", "base")}

    # The weights: TIES of the parents' tensors, the key set as saved (tied embedding stored once).
    parents = {k: _tensors(v) for k, v in finals.items()}
    merged = _tensors(out)
    assert merged.keys() == parents["a"].keys() and "lm_head.weight" not in merged
    for key, tensor in merged.items():
        expected = ops.merge_tensor("ties", [parents["a"][key], parents["b"][key]], None, parents["base"][key],
                                    {"density": 0.5, "scale": 1.0}, name=key)
        assert torch.allclose(tensor, expected, atol=1e-6), key

    # Plain transformers loads it with those weights.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.items())
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("the model data token")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["name"], lineage["stage"]) == ("ties", "merge")
    assert [(p["role"], p["path"], p["weight"]) for p in lineage["parents"]] == [
        ("merge-input", str(finals["a"].resolve()), 1.0), ("merge-input", str(finals["b"].resolve()), 1.0),
        ("base", str(finals["base"].resolve()), None)]
    assert [p["weights_sha256"] for p in lineage["parents"]] == [weight_files_sha256(finals[k]) for k in ("a", "b", "base")]
    assert lineage["method"] == {"name": "ties", "options": {"density": 0.5, "scale": 1.0, "normalize": False,
                                                            "majority_sign": "total"}}

    record = json.loads((out / "merge.json").read_text())
    table = record["eval"]["table"]
    domains = [Path(family["A"]).name, Path(family["B"]).name]
    assert [r["domain"] for r in table["rows"]] == domains and table["columns"] == ["a", "b", "base", "merge"]
    assert table["worst_domain"] == max(table["rows"], key=lambda r: r["loss"]["merge"])["domain"]
    for row in table["rows"]:
        parent_losses = [row["loss"]["a"], row["loss"]["b"]]
        assert row["vs_best_parent"] == pytest.approx(row["loss"]["merge"] - min(parent_losses))
        assert row["vs_parent_mean"] == pytest.approx(row["loss"]["merge"] - sum(parent_losses) / 2)
    # what each domain was scored on: the held-out split the runs trained with (data.eval_fraction 0.02)
    assert record["eval"]["splits"] == {d: {"split": "held-out", "eval_fraction": 0.02} for d in domains}
    memory = record["merge"]["memory"]
    assert memory["peak_rss_bytes"] >= memory["rss_before_bytes"] > 0 and memory["model_bytes"] > 0
    text = "\n".join(map(str, logged))
    assert "vs best parent" in text and f"{table['worst_domain']} *" in text and "peak RSS during the merge" in text

    # The merge's lineage leads `tunelab eval` to its parents' held-out text: the very numbers of the table.
    from tunelab.commands.evaluate import evaluate_model

    for model, column in ((out, "merge"), (finals["a"], "a")):
        scores = evaluate_model(str(model), [family["A"]], seq_len=32, max_tokens=256, log=lambda *a: None)
        (scored,) = scores.values()
        assert (scored["split"], scored["eval_fraction"]) == ("held-out", 0.02)
        assert scored["loss"] == pytest.approx(table["rows"][0]["loss"][column], rel=1e-6)


def test_one_line_cli_and_a_recipe(family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dare"
    result = run_cli("merge", str(family["a"]), str(family["b"]), "--method", "dare_ties", "--base", str(family["base"]),
                     "--weights", "0.5,0.5", "--density", "0.5", "--seed", "3", "--data", family["A"],
                     "--set", EVAL[0], "--set", EVAL[1], "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "vs best parent" in result.stderr and "peak RSS during the merge" in result.stderr
    lineage = json.loads((out / "lineage.json").read_text())
    assert [p["weight"] for p in lineage["parents"]] == [0.5, 0.5, None]
    assert lineage["method"]["options"]["seed"] == 3
    # A recipe is the other form of the same command.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "merge", "models": [str(family["a"]), str(family["b"])],
                                      "method": "slerp", "options": {"t": 0.3}, "eval": {"data": []}}))
    code, stdout, stderr = _main(monkeypatch, capsys, "merge", recipe, "--set", "options.t=0.7", "--out",
                                 tmp_path / "slerp", "--quiet")
    assert code == 0 and stdout.strip() == str(tmp_path / "slerp"), stderr
    assert json.loads((tmp_path / "slerp" / "lineage.json").read_text())["method"]["options"]["t"] == 0.7


def test_a_lora_adapter_is_merged_onto_its_base_first(family, tmp_path):
    from tunelab.models import load_model

    out = _merge([family["a"], family["lora"]], tmp_path / "with-lora", set=["eval.data=[]"])
    adapter = load_model(str(family["lora"] / "final"), merge=True).state_dict()
    a, merged = _tensors(family["a"] / "final"), _tensors(out)
    for key, tensor in merged.items():
        assert torch.allclose(tensor, (a[key] + adapter[key]) / 2, atol=1e-6), key
    parent = json.loads((out / "lineage.json").read_text())["parents"][1]
    assert parent["path"] == str((family["lora"] / "final").resolve())
    assert parent["weights_sha256"] == weight_files_sha256(family["lora"] / "final")
    assert parent["adapter_base"]["path"] == str((family["base"] / "final").resolve())
    assert "merge.json" in {p.name for p in out.iterdir()} and "eval" not in json.loads((out / "merge.json").read_text())


def test_greedy_soup_and_a_weight_sweep(family, tmp_path):
    data = f"eval.data=[{family['A']}, {family['B']}]"
    out = _merge([family["a"], family["b"], family["base"]], tmp_path / "soup", method="greedy_soup", set=[data])
    record = json.loads((out / "merge.json").read_text())
    soup = record["greedy_soup"]
    scores = record["eval"]["scores"]
    worst = {label: max(r["loss"] for r in scores[label].values()) for label in ("a", "b", "base")}
    assert soup["order"] == sorted(worst, key=lambda k: worst[k])  # by their own worst-domain loss
    assert soup["decisions"][0]["kept"] and soup["members"][0] == soup["order"][0]
    for d in soup["decisions"][1:]:  # kept exactly when the soup with it beat the soup before it
        before = min(x["score"] for x in soup["decisions"][:soup["decisions"].index(d)] if x["kept"])
        assert d["kept"] == (d["score"] < before)
    members = soup["members"]
    finals = {k: _tensors(family[k] / "final") for k in ("a", "b", "base")}
    for key, tensor in _tensors(out).items():
        assert torch.allclose(tensor, sum(finals[m][key] for m in members) / len(members), atol=1e-6), key
    weights = {p["label"]: (p["weight"], p["kept"]) for p in json.loads((out / "lineage.json").read_text())["parents"]}
    assert weights == {k: ((1 / len(members), True) if k in members else (0.0, False)) for k in ("a", "b", "base")}

    out = _merge([family["a"], family["b"]], tmp_path / "sweep",
                 set=[data, "sweep.weights=[[1, 0], [0.5, 0.5], [0.2, 0.8]]"])
    sweep = json.loads((out / "merge.json").read_text())["sweep"]
    best = min(sweep, key=lambda c: c["score"])
    assert [c["chosen"] for c in sweep] == [c is best for c in sweep]
    assert all(c["score"] == max(r["loss"] for r in c["scores"].values()) for c in sweep)  # worst-domain loss
    w = best["weights"]
    for key, tensor in _tensors(out).items():
        expected = (w[0] * finals["a"][key] + w[1] * finals["b"][key]) / sum(w)
        assert torch.allclose(tensor, expected, atol=1e-6), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup", "sweep"]  # only the winner is kept


@pytest.fixture(scope="module")
def oddballs(family):
    """A model of another depth (same tokenizer) and a copy of b whose vocabulary swaps two tokens."""
    from tunelab import models, tokenizers

    root = family["root"]
    tok = tokenizers.load_tokenizer(str(family["a"] / "final"))
    deeper = root / "deeper"
    models.build_model("llama-micro", tok, overrides={"num_hidden_layers": 3}).save_pretrained(deeper)
    tok.save_pretrained(deeper)
    swapped = Path(shutil.copytree(family["b"] / "final", root / "swapped"))
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    vocab[by_id[300]], vocab[by_id[301]] = 301, 300
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    return {"deeper": deeper, "swapped": swapped, "tokens": (by_id[300], by_id[301])}


def _main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`tunelab ARGS` in this process (a subprocess per case would cost ~5 s of imports each)."""
    from tunelab.commands import cli

    monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", ["architecture", "vocabulary", "slerp_three", "density", "weights", "no_base",
                                  "missing", "occupied", "training_recipe"])
def test_bad_inputs_are_one_line_errors_exit_2_nothing_written(family, oddballs, tmp_path, monkeypatch, capsys, case):
    a, b, base = family["a"], family["b"], family["base"]
    out = tmp_path / "out"
    args, needles = {
        "architecture": ([a, oddballs["deeper"]], ["models differ: deeper has tensor model.layers.2.",
                                                   "that a lacks"]),
        "vocabulary": ([a, oddballs["swapped"]], ["vocabularies differ: token 300 is "
                                                  f"{oddballs['tokens'][1]!r} in swapped but {oddballs['tokens'][0]!r} in a"]),
        "slerp_three": ([a, b, base, "--method", "slerp"], ["slerp interpolates between exactly two models (got 3)"]),
        "density": ([a, b, "--method", "ties", "--base", base, "--density", "1.5"], ["options.density"]),
        "weights": ([a, b, "--weights", "0.5"], ["--weights: 1 weights for 2 models"]),
        "no_base": ([a, b, "--method", "ties"], ["base: method ties merges task vectors"]),
        "missing": ([a, tmp_path / "nope"], ["models.1.path", "nope does not exist"]),
        "occupied": ([a, b], ["already exists and is not empty"]),
        "training_recipe": (["quickstart"], ["this is a 'pretrain' recipe; run it with `tunelab pretrain`"]),
    }[case]
    if case == "occupied":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    code, stdout, stderr = _main(monkeypatch, capsys, "merge", *args, "--out", out, "--set", EVAL[0])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if case == "occupied":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        _nothing_written(out)


def test_a_merge_recipe_is_refused_by_the_training_commands(monkeypatch, capsys):
    code, _, stderr = _main(monkeypatch, capsys, "pretrain", RECIPES_DIR / "merges" / "merge-ties.yaml")
    assert code == 2 and "this is a 'merge' recipe; run it with `tunelab merge`" in stderr


MERGE_RECIPES = sorted(p.stem for p in (RECIPES_DIR / "merges").glob("*.yaml"))


def test_merge_recipes_are_shipped_apart_from_training_recipes():
    assert {"merge-ties", "merge-soup"} <= set(MERGE_RECIPES)
    for name in MERGE_RECIPES:  # kind: merge, named after the file, and valid as shipped
        shipped = yaml.safe_load((RECIPES_DIR / "merges" / f"{name}.yaml").read_text())
        assert shipped["kind"] == "merge" and shipped["name"] == name
        assert cli_recipe([name]).name == name
    assert not [p for p in RECIPES_DIR.glob("*.yaml") if yaml.safe_load(p.read_text()).get("kind") == "merge"]


@pytest.mark.parametrize("recipe", MERGE_RECIPES)
def test_shipped_merge_recipe_at_toy_scale(family, tmp_path, recipe):
    # The shipped models are the quickstart's runs; here the toy family stands in for them.
    shipped = yaml.safe_load((RECIPES_DIR / "merges" / f"{recipe}.yaml").read_text())
    sets = [f"models=[{family['a']}, {family['b']}]", f"eval.data=[{family['A']}, {family['B']}]"]
    if shipped.get("base"):
        sets.append(f"base={family['base']}")
    out = run_merge(cli_recipe([recipe], overrides=EVAL + sets), out=tmp_path / "out", **QUIET)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"]["name"] == shipped["method"]
    assert len(json.loads((out / "merge.json").read_text())["eval"]["table"]["rows"]) == 2


def test_pipeline_merge_stage_substitutes_stages_and_skips_when_done(family, tmp_path):
    from tunelab.commands.pipeline import run_pipeline

    train = {"model": {"preset": "llama-micro"}, "tokenizer": {"path": str(family["base"] / "final")},
             "data": {"train": family["A"], "seq_len": 32},
             "train": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32", "eval_max_tokens": 64}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(train))
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump({
        "kind": "merge", "models": ["${one}", "${two}"], "method": "linear",
        "eval": {"data": [family["A"]], "seq_len": 32, "max_tokens": 128}}))
    spec = {"name": "p", "stages": [
        {"name": "one", "pretrain": "tiny.yaml"},
        {"name": "two", "pretrain": "tiny.yaml", "set": {"model.path": "${one}"}},
        {"name": "soup", "merge": "soup.yaml"},
        {"name": "far", "merge": "merge-soup",  # a shipped merge recipe (recipes/merges/), a greedy soup
         "set": {"models": ["${soup}", str(family["a"])], "eval.data": [family["A"]], "eval.seq_len": 32,
                 "eval.max_tokens": 128}},
    ]}
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(spec))
    root = tmp_path / "runs"
    outputs = run_pipeline(pipe, out=root, quiet=True)
    assert outputs["soup"] == root / "soup" / "final" and (outputs["soup"] / "merge.json").is_file()
    parents = json.loads((outputs["soup"] / "lineage.json").read_text())["parents"]
    assert [p["path"] for p in parents] == [str((root / n / "final").resolve()) for n in ("one", "two")]
    assert json.loads((outputs["far"] / "lineage.json").read_text())["parents"][0]["path"] == str(outputs["soup"].resolve())
    stamp = (outputs["far"] / "model.safetensors").stat().st_mtime_ns
    run_pipeline(pipe, out=root, quiet=True)  # nothing changed: all skipped
    assert (outputs["far"] / "model.safetensors").stat().st_mtime_ns == stamp
    spec["stages"][2]["set"] = {"models.0.weight": 3, "models.1.weight": 1}
    pipe.write_text(yaml.safe_dump(spec))
    outputs = run_pipeline(pipe, out=root, quiet=True)  # the merge changed: it and what follows re-run elsewhere
    assert outputs["soup"].parent.name.startswith("soup.") and outputs["far"].parent.name.startswith("far.")
    assert sorted(p.name.split(".")[0] for p in root.iterdir() if p.is_dir()) == ["far", "far", "one", "soup", "soup", "two"]
