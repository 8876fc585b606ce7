"""The evaluation suite end to end on tiny trained runs: several models against a base (deltas equal
independent evals), multiple-choice tasks (a JSONL file and the built-in stdlib task), generation quality,
the CLI's JSON equal to the in-process result, one-line errors, scaling fits over run directories, and the
lm-evaluation-harness bridge (when lm-eval is installed).

A tiny "prose" base run and a run continued from it on "notes" are shared by the module; everything runs on
one CPU thread (these models are so small that a second thread only spins)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, write_corpus
from tunelab.recipe import validate_recipe
from tunelab.stages import run_stage

SEQ = 32
EVAL_TOKENS = 256
GEN = {"prompts": 2, "prompt_tokens": 8, "max_new_tokens": 12}
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def one_thread():
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")  # CLI subprocesses inherit os.environ
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    mp.undo()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite")
    return {"prose": write_corpus(root / "prose", n_docs=30, seed=0), "notes": write_corpus(root / "notes", n_docs=24, seed=1)}


def _recipe(source: str, name: str, **extra) -> dict:
    return {"name": name, "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
            "data": {"train": source, "seq_len": SEQ, "eval_fraction": 0.1},
            "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3, "log_every": 2, "eval_max_tokens": EVAL_TOKENS,
                      "precision": "fp32"}, **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpora) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    base = run_stage(validate_recipe(_recipe(str(corpora["prose"]), "base"), "base"), out=root / "base", quiet=True)
    cont = run_stage(validate_recipe(_recipe(str(corpora["notes"]), "cont", init_from=str(base)), "cont"),
                     out=root / "cont", quiet=True)
    return {"base": base, "cont": cont}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "words.jsonl"
    rng = np.random.default_rng(0)
    vocab = "the model data token train loss step layer weight value".split()
    with open(path, "w") as f:
        for i in range(24):
            context = " ".join(rng.choice(vocab, 6))
            f.write(json.dumps({"context": context, "choices": [" " + w for w in rng.choice(vocab, 3, replace=False)],
                                "answer": i % 3}) + "\n")
    return path


@pytest.fixture(scope="module")
def suite(runs, corpora, task_file) -> dict:
    from tunelab.commands.evaluate import evaluate_suite

    return evaluate_suite([str(runs["cont"] / "final")], [str(corpora["prose"]), str(corpora["notes"])],
                          tasks=[str(task_file), "builtin:stdlib-module"], generation=GEN,
                          relative_to=str(runs["base"] / "final"), seq_len=SEQ, max_tokens=EVAL_TOKENS, **QUIET)


# ---------------------------------------------------------------- several models against a base


def test_deltas_equal_the_difference_of_independent_evals(runs, corpora, suite):
    from tunelab.commands.evaluate import evaluate_model

    sources = [str(corpora["prose"]), str(corpora["notes"])]
    # Scored alone, with the held-out split forced: the suite scores both on what either trained on.
    alone = {name: evaluate_model(str(runs[name] / "final"), sources, seq_len=SEQ, max_tokens=EVAL_TOKENS,
                                  split="held-out", **QUIET) for name in ("base", "cont")}
    table = suite["perplexity"]
    assert suite["base"] == "base" and suite["models"] == {"base": str(runs["base"] / "final"),
                                                           "cont": str(runs["cont"] / "final")}
    assert table["base"]["values"] == {d: alone["base"][d]["loss"] for d in ("prose", "notes")}
    rows = {r["domain"]: r for r in table["rows"]}
    assert {d: r["role"] for d, r in rows.items()} == {"prose": "reference", "notes": "target"}
    assert all(r["split"] == "held-out" for r in rows.values())
    for domain in ("prose", "notes"):
        cell = rows[domain]["cells"]["cont"]
        assert cell["value"] == alone["cont"][domain]["loss"]
        assert cell["delta"] == alone["cont"][domain]["loss"] - alone["base"][domain]["loss"]
    (summary,) = table["runs"]
    assert summary["mean_forgetting"] == rows["prose"]["cells"]["cont"]["delta"]
    assert summary["mean_gain"] == -rows["notes"]["cells"]["cont"]["delta"] > 0  # it trained on notes


def test_tasks_report_accuracies_with_intervals_and_paired_deltas(suite, task_file):
    tasks = suite["tasks"]
    assert set(tasks) == {"words", "stdlib-module"}
    assert tasks["words"]["examples"] == 24 and tasks["words"]["chance"] == pytest.approx(1 / 3)
    assert tasks["stdlib-module"]["examples"] == 200 and tasks["stdlib-module"]["chance"] == 0.25
    for task in tasks.values():
        assert set(task["models"]) == {"base", "cont"}
        for name, cell in task["models"].items():
            for metric in ("acc", "acc_token", "acc_byte"):
                low, high = cell[metric]["ci"]
                assert 0 <= low <= cell[metric]["value"] <= high <= 1
                assert ("delta" in cell[metric]) == (name == "cont")
        delta = task["models"]["cont"]["acc"]["delta"]
        assert delta["value"] == pytest.approx(task["models"]["cont"]["acc"]["value"] - task["models"]["base"]["acc"]["value"])
        assert delta["ci"][0] <= delta["value"] <= delta["ci"][1]


def test_generation_measures_for_every_model_and_domain(suite):
    gen = suite["generation"]
    assert set(gen) == {"base", "cont"}
    for per_domain in gen.values():
        assert set(per_domain) == {"prose", "notes"}
        for g in per_domain.values():
            assert g["split"] == "held-out" and g["settings"]["prompts"] == 2
            assert g["greedy"]["continuations"] == 2 and g["sampled"]["continuations"] == 4  # 2 samples per prompt
            for mode in ("greedy", "sampled"):
                m = g[mode]
                assert m["mean_length"] == GEN["max_new_tokens"]  # EOS suppressed: equal lengths
                assert 0 <= m["rep_1"] <= 1 and 0 < m["distinct_1"] <= 1 and m["mean_entropy"] > 0
                assert 0 <= m["longest_repeat"] <= GEN["max_new_tokens"] - 1


def test_cli_json_equals_the_in_process_result_and_the_table_prints(runs, corpora, task_file, suite, capsys):
    from tunelab.commands.evaluate import render_suite

    result = run_cli("eval", str(runs["cont"] / "final"), "--relative-to", str(runs["base"] / "final"),
                     "--data", str(corpora["prose"]), "--data", str(corpora["notes"]), "--task", str(task_file),
                     "--task", "builtin:stdlib-module", "--generation", "--prompts", "2", "--prompt-tokens", "8",
                     "--max-new-tokens", "12", "--seq-len", str(SEQ), "--max-tokens", str(EVAL_TOKENS), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == json.loads(json.dumps(suite))  # seeded: sampling and bootstrap alike
    render_suite(suite)
    out = capsys.readouterr().out
    for text in ("delta from base base", "notes", "task stdlib-module", "acc per byte", "generation", "greedy"):
        assert text in out, text


def test_bad_task_file_is_a_one_line_error(runs, tmp_path, monkeypatch, capsys):
    from tunelab.commands.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": [" a", " b"], "answer": 0}) + "\n"
                   + json.dumps({"context": "x", "choices": [" a", " b"], "answer": 5}) + "\n")
    monkeypatch.setattr(sys, "argv", ["tunelab", "eval", str(runs["base"] / "final"), "--task", str(bad)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and f"{bad}:2: answer 5 is out of range" in err


def test_other_bad_inputs_are_one_line_errors(runs, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.commands.evaluate import evaluate_suite

    final = str(runs["base"] / "final")
    for kwargs, words in ((dict(tasks=["builtin:nope"]), "builtin:nope is not a built-in task"),
                          (dict(sources=["builtin:prose"], metric="ppl"), "--metric"),
                          (dict(relative_to=str(tmp_path / "missing")), "does not exist")):
        with pytest.raises(TunelabError, match=words) as err:
            evaluate_suite([final], **kwargs, **QUIET)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the built-in task


def test_builtin_task_is_deterministic_and_well_formed(tmp_path):
    from tunelab.eval.builtin_tasks import builtin_task_file, stdlib_module_examples
    from tunelab.eval.multiple_choice import read_task

    functions = [(f"mod{i % 7}", f"f{i}", "x", f"Does {i}.") for i in range(40)] + [("mod1", "dup", "", "A."),
                                                                                    ("mod2", "dup", "", "B.")]
    first = stdlib_module_examples(functions, n=len(functions), seed=3)
    assert first == stdlib_module_examples(functions, n=len(functions), seed=3)
    assert first != stdlib_module_examples(functions, n=len(functions), seed=4)
    for e in first:
        modules = [c.strip() for c in e["choices"]]
        name = e["context"].split("(")[0].removeprefix("def ")
        assert len(set(modules)) == 4 and f"The function {name} above" in e["context"]
        assert name == "dup" or modules[e["answer"]] == f"mod{int(name[1:]) % 7}"
        if name == "dup":  # a name two modules define: the other one is never a distractor
            assert len({"mod1", "mod2"} & set(modules)) == 1
    # The file from a (fake, small) stdlib: public documented functions only, cached, the same every time.
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "_private.py").write_text('def hidden():\n    "Not asked."\n')
    (root / "pkg" / "__init__.py").write_text('def skipped():\n    pass\n')
    for i in range(6):
        (root / f"mod{i}.py").write_text(f'def f{i}(a, b=1):\n    """Does {i}.\n\n    More."""\n\n'
                                         f'def _g{i}():\n    "Private."\n')
    (root / "pkg" / "sub.py").write_text('def sub_f(x):\n    """Sub thing."""\n')
    path = builtin_task_file("stdlib-module", cache_dir=tmp_path / "a", root=root)
    again = builtin_task_file("stdlib-module", cache_dir=tmp_path / "b", root=root)
    assert path.read_bytes() == again.read_bytes()
    examples = read_task(path)
    assert len(examples) == 7 and all(len(e.choices) == 4 for e in examples)
    assert {e.choices[e.answer] for e in examples} == {f" mod{i}" for i in range(6)} | {" pkg.sub"}
    assert any('def f0(a, b=1):\n    """Does 0."""' in e.context for e in examples)
    # The real one (generated for this test session by the suite fixture or now): 200 examples of 4 choices.
    real = read_task(builtin_task_file("stdlib-module"))
    assert len(real) == 200 and all(len(e.choices) == 4 and 0 <= e.answer < 4 for e in real)


# ---------------------------------------------------------------- scaling over run directories


def _fake_run(root: Path, name: str, n_params: int, tokens: int, loss: float) -> Path:
    from safetensors.numpy import save_file

    run = root / name
    (run / "final").mkdir(parents=True)
    # int8 tensors: only the parameter count matters, and the files stay small.
    save_file({"model.embed_tokens.weight": np.zeros((100, 10), np.int8),
               "model.layers.0.mlp.weight": np.zeros(n_params - 1000, np.int8)}, str(run / "final" / "model.safetensors"))
    events = [{"event": "train", "step": 10, "tokens": tokens, "loss": loss + 0.1},
              {"event": "eval", "step": 10, "tokens": tokens, "domain": "prose", "role": "target", "loss": loss,
               "bpb": loss / 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_scaling_cli_recovers_a_known_compute_law(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for i, (n, d) in enumerate(zip(np.geomspace(2e4, 2e6, 7).astype(int), np.geomspace(1e6, 1e8, 7).astype(int))):
        c = 6.0 * n * d
        runs.append(_fake_run(tmp_path, f"r{i}", int(n), int(d), (1.5 + 400 * c ** -0.15) * np.exp(rng.normal(0, 0.003))))
    svg = tmp_path / "fit.svg"
    result = run_cli("scaling", *map(str, runs), "--svg", str(svg), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["domain"] == "prose" and [p["N"] for p in out["points"]] == list(np.geomspace(2e4, 2e6, 7).astype(int))
    b, ci = out["fit"]["values"]["b"], out["fit"]["ci95"]["b"]
    assert ci[0] < 0.15 < ci[1] and b == pytest.approx(0.15, abs=0.02)
    assert out["extrapolation"][0]["C"] == pytest.approx(10 * max(p["C"] for p in out["points"]))
    root = ET.fromstring(svg.read_text())  # well-formed, with one circle per run and the curve
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}circle")) == 7 and root.findall(f"{ns}polyline")

    non_embedding = run_cli("scaling", *map(str, runs), "--params", "non-embedding", "--no-floor")
    assert non_embedding.returncode == 0, non_embedding.stderr[-3000:]
    assert "L(C) = " in non_embedding.stdout and "[" in non_embedding.stdout
    from tunelab.eval.scaling import run_point

    assert run_point(runs[0], "prose", params="non-embedding")["N"] == run_point(runs[0], "prose")["N"] - 1000

    too_few = run_cli("scaling", *map(str, runs[:3]))
    assert too_few.returncode == 2 and too_few.stderr.count("\n") == 1 and "at least 4" in too_few.stderr


def test_scaling_chinchilla_form_over_runs(tmp_path):
    from tunelab.eval.scaling import scaling_fit, svg_plot

    rng = np.random.default_rng(1)
    runs = []
    for i, n in enumerate(np.geomspace(1e5, 1e7, 4).astype(int)):
        for j, d in enumerate(np.geomspace(1e7, 1e9, 4).astype(int)):
            loss = (1.7 + 400 * n ** -0.34 + 410 * d ** -0.28) * np.exp(rng.normal(0, 0.003))
            runs.append(_fake_run(tmp_path, f"n{i}d{j}", int(n), int(d), loss))
    result = scaling_fit(runs, form="ln")
    for name, true in (("alpha", 0.34), ("beta", 0.28)):
        low, high = result["fit"]["ci95"][name]
        assert low < true < high, name
    assert ET.fromstring(svg_plot(result)).tag.endswith("svg")


# ---------------------------------------------------------------- lm-evaluation-harness bridge


@pytest.mark.slow
def test_lm_eval_runs_offline_on_a_local_task(runs, task_file, tmp_path):
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    if lm_eval is None:
        pytest.skip("lm-eval is not installed (pip install lm-eval torch==2.13.0, or the lm-eval extra)")
    from tunelab.eval.multiple_choice import read_task

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    # The README's template: a local JSONL through the `json` dataset builder, choices with their leading space.
    (task_dir / "tunelab_words.yaml").write_text(f"""task: tunelab_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task_file}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    out = tmp_path / "out"
    result = subprocess.run([lm_eval, "--model", "hf", "--model_args",
                             f"pretrained={runs['cont'] / 'final'},dtype=float32", "--tasks", "tunelab_words",
                             "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "8",
                             "--output_path", str(out)], capture_output=True, text=True, env=env, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (results_file,) = out.rglob("results_*.json")
    scores = json.loads(results_file.read_text())
    acc = scores["results"]["tunelab_words"]["acc,none"]
    assert 0 <= acc <= 1
    assert scores["n-samples"]["tunelab_words"]["effective"] == len(read_task(task_file))
