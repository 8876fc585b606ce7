"""`tunelab report`: the HTML page from hand-written run directories (tests/report_runs.py).

What is checked: every run and every lineage edge is on the page, the page is self-contained (no
script, nothing fetched) and every plot has points, axes carry units, bad input gives one-line
errors or warnings, different tokenizers switch the comparison to bits per byte, and the optional
TensorBoard export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from report_runs import TOKENIZER, curve, make_lifecycle, write_run
from tunelab.errors import RunDirError
from tunelab.report import write_report
from tunelab.report.collect import EvalStage, expand, load, summary, wall_seconds
from tunelab.report.svg import fmt, line_plot, nice_ticks
from tunelab.runs import lineage_dir


@pytest.fixture()
def lifecycle(tmp_path) -> dict[str, Path]:
    return make_lifecycle(tmp_path / "pipe")


def _report(runs, out: Path, **kwargs) -> tuple[str, list[str]]:
    warnings: list[str] = []
    write_report(runs, out, warn=warnings.append, **kwargs)
    return out.read_text(), warnings


def _expected_edges(model_dirs: list[Path]) -> set[tuple[str, str]]:
    """(parent id, child id) for every parent and every training source in each lineage.json, worked out
    here from the files themselves: a parent is the directory holding its lineage.json, else its preset."""
    edges, todo, seen = set(), list(model_dirs), set()
    while todo:
        where = lineage_dir(todo.pop())
        if where is None or str(where.resolve()) in seen:
            continue
        seen.add(str(where.resolve()))
        record = json.loads((where / "lineage.json").read_text())
        for parent in record["parents"]:
            if parent.get("path"):
                edges.add((str(lineage_dir(parent["path"]).resolve()), str(where.resolve())))
                todo.append(Path(parent["path"]))
            else:
                edges.add((f"preset:{parent['preset']}", str(where.resolve())))
        for data in record.get("data", []):
            edges.add((f"data:{data['content_hash']}", str(where.resolve())))
    return edges


def _drawn_edges(page: str) -> set[tuple[str, str]]:
    """(parent id, child id) of every edge drawn; a data source drawn again beside a later column is `ID#col`."""
    found = re.findall(r'<path class="edge[^"]*" data-src="([^"]+)" data-dst="([^"]+)"', page)
    return {(re.sub(r"#\d+$", "", src), dst) for src, dst in found}


def test_pipeline_report_has_every_run_and_every_lineage_edge(lifecycle, tmp_path):
    runs = [lifecycle[k] for k in ("base", "cont", "lora", "soup")]
    score = EvalStage("score", json.loads(lifecycle["score"].read_text()), model=str(lifecycle["soup"]))
    page, warnings = _report(runs, tmp_path / "report.html", title="pipeline demo", eval_stages=[score])
    assert warnings == []
    for name in ("base", "cont", "lora", "soup"):
        assert f">{name}</a>" in page  # in the runs table, linked to its details
    assert page.count('<section class="run"') == 4
    expected = _expected_edges(runs)
    assert len(expected) == 10  # preset->base, prose->base, base->cont, code->cont, prose(replay)->cont,
    drawn = _drawn_edges(page)  # base->lora, code->lora, cont->soup, lora->soup, base->soup
    assert expected <= drawn
    assert (str(lifecycle["soup"].resolve()), "eval:score") in drawn
    assert drawn - expected == {(str(lifecycle["soup"].resolve()), "eval:score")}
    # Roles and short hashes on the edges, content hashes on the data nodes, config one click away.
    for text in ("merge-input w=0.5", "c0ffee00", "init @step 200", "a1b2c3d4", "replay", "f565d68c", "llama-tiny"):
        assert text in page, text
    assert page.count("<summary>resolved config (config.yaml)</summary>") == 3
    assert "<summary>resolved config (merge.json recipe)</summary>" in page
    assert "held-out scores recorded by the merge" in page and "Eval stages" in page


def test_page_is_self_contained_and_every_plot_has_points(lifecycle, tmp_path):
    page, _ = _report([lifecycle["base"], lifecycle["cont"], lifecycle["lora"]], tmp_path / "r.html")
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert re.findall(r"https?://[^\s\"'<>]+", page) == ["http://www.w3.org/2000/svg"] * page.count("xmlns=")
    plots = re.findall(r'<svg class="plot".*?</svg>', page, flags=re.S)
    # training loss, LR, grad norm, throughput; eval prose + code; forgetting prose; each by step and by tokens
    assert len(plots) == 2 * 7
    for plot in plots:
        points = re.findall(r'<polyline points="([^"]+)"', plot)
        assert points and all(len(p.split()) >= 1 for p in points)
    for label in ("loss (nats/token)", ">step<", "tokens (trained by the run)", "learning rate",
                  "Δ loss since step 0 (nats/token)", "tokens/s", "global gradient norm (L2)"):
        assert label in page, label
    # The comparison table: sizes from the model event, the adapter's trainable count, right-aligned numbers.
    assert '<td class="num">926,336</td>' in page and '<td class="num">20,480</td>' in page
    assert re.search(r'<th class="num">tokens/s</th>', page)
    assert "forgetting +" in page and "gain +" in page  # compare.forgetting_table's summary per run


def test_plot_axes_and_ticks():
    assert nice_ticks(0, 400) == [0, 100, 200, 300, 400]
    assert [fmt(t, 20000) for t in nice_ticks(0, 81920)] == ["0", "20k", "40k", "60k", "80k"]
    assert [fmt(t, 0.0005) for t in nice_ticks(0, 0.002)] == ["0", "0.0005", "0.001", "0.0015", "0.002"]
    svg = line_plot([{"name": "a", "color": "#000", "points": [(0, 1.0), (10, float("nan")), (20, None), (30, 2.0)]}],
                    "step", "loss (nats/token)")
    assert svg.count("<polyline") == 1 and re.search(r'points="[\d.]+,[\d.]+ [\d.]+,[\d.]+"', svg)
    single = line_plot([{"name": "a", "color": "#000", "points": [(5, 3.0)]}], "step", "loss")
    assert "<circle" in single  # one point still shows
    assert line_plot([{"name": "a", "color": "#000", "points": [(1, None)]}], "step", "loss") == ""


def test_truncated_last_line_is_ignored_with_a_warning(tmp_path):
    run = write_run(tmp_path / "torn", curve(40, 10, 20, {"prose": ("target", 6.0, 4.0)}),
                    None, torn_last_line=True)
    page, warnings = _report([run], tmp_path / "r.html")
    assert len(warnings) == 1 and str(run / "metrics.jsonl") in warnings[0] and "last line" in warnings[0]
    assert warnings[0] in page.replace("&#x27;", "'")  # listed at the top of the page too
    assert page.count('<svg class="plot"') >= 2  # the rest is plotted


def test_run_without_metrics_is_listed(tmp_path, lifecycle):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("name: empty\n")
    page, warnings = _report([lifecycle["base"], empty], tmp_path / "r.html")
    assert warnings == [f"{empty}: no metrics (metrics.jsonl is missing): listed without curves"]
    assert '<span class="badge">no metrics</span>' in page and page.count('<section class="run"') == 2


def test_different_tokenizers_compare_bits_per_byte(tmp_path):
    events = curve(40, 10, 20, {"prose": ("target", 6.0, 4.0)})
    a = write_run(tmp_path / "a", events, {"parents": [], "tokenizer": {"fingerprint": TOKENIZER}})
    b = write_run(tmp_path / "b", events, {"parents": [], "tokenizer": {"fingerprint": "9" * 64}})
    page, warnings = _report([a, b], tmp_path / "r.html")
    assert len(warnings) == 1 and "different tokenizers" in warnings[0] and "bits per byte" in warnings[0]
    assert "a: 4f92c3f7" in warnings[0] and "b: 99999999" in warnings[0]
    assert "prose: held-out bits per byte" in page and "prose: held-out loss" not in page
    assert "last evaluation (bits per byte)" in page
    assert page.count("<figcaption>Training loss") == 2  # one per tokenizer, never overlaid


def test_arguments_globs_folders_and_stage_dirs(lifecycle, tmp_path):
    root = lifecycle["base"].parent
    paths, evals = expand([root])  # a pipeline's output folder: its runs, the merge's final/, the eval stage
    assert [p.name for p in paths] == ["base", "cont", "lora", "final"]
    assert [e.name for e in evals] == ["score"]
    assert [p.name for p in expand([f"{root}/[bc]*"])[0]] == ["base", "cont"]  # a quoted glob
    assert expand([root / "soup"])[0] == [root / "soup" / "final"]
    assert [e.label for e in load(paths, print)] == ["base", "cont", "lora", "soup"]
    with pytest.raises(RunDirError, match=r"RUN: .*nothing\*\* matches nothing"):
        expand([f"{root}/nothing**"])
    with pytest.raises(RunDirError, match="is not a run directory"):
        expand([tmp_path])  # holds only the pipeline folder, which is not a run


def test_cli_errors_are_one_line(tmp_path, lifecycle):
    missing = run_cli("report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html"))
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "missing does not exist" in missing.stderr
    ok = run_cli("report", str(lifecycle["base"]), str(lifecycle["cont"]), "-o", str(tmp_path / "out" / "r.html"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "out" / "r.html") and (tmp_path / "out" / "r.html").is_file()


def test_summary_numbers(tmp_path):
    events = [{"event": "model", "parameters": 10, "trainable": 4, "time": 100.0},
              {"event": "train", "step": 10, "tokens": 1000, "tokens_per_s": 100.0, "loss": 3.0, "time": 110.0},
              {"event": "train", "step": 20, "tokens": 2000, "tokens_per_s": 300.0, "loss": 2.0, "time": 120.0},
              {"event": "resume", "step": 20, "checkpoint": "step-20", "time": 500.0},  # 380 s down: not counted
              {"event": "train", "step": 30, "tokens": 3000, "tokens_per_s": 200.0, "loss": 1.5, "time": 505.0}]
    assert wall_seconds(events) == pytest.approx(25.0)
    entry = load([write_run(tmp_path / "r", events, None)], print)[0]
    row = summary(entry)
    assert (row["parameters"], row["trainable"], row["steps"], row["tokens"], row["tokens_per_s"],
            row["train_loss"]) == (10, 4, 30, 3000, 200.0, 1.5)


def test_samples_are_shown(tmp_path):
    events = curve(20, 10, 20, {"prose": ("target", 6.0, 4.0)})
    events += [{"event": "sample", "step": 20, "prompt": "def f(", "text": "x): <b>old</b>"},
               {"event": "sample", "step": 20, "prompt": "def f(", "text": "x): return x"},  # a re-run: the last one
               {"event": "sample", "step": 20, "prompt": "Return", "text": "Return the number"}]  # prompt included
    page, _ = _report([write_run(tmp_path / "s", events, None)], tmp_path / "r.html")
    assert "<b>def f(</b>x): return x" in page and "&lt;b&gt;old" not in page
    assert "<b>Return</b> the number" in page


def test_tensorboard_export(lifecycle, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install 'tunelab[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunelab.report import write_tensorboard

    for _ in range(2):  # a re-export replaces the first one's files
        logdir = write_tensorboard([lifecycle["cont"]], tmp_path / "tb", warn=pytest.fail)
    assert len(list((logdir / "cont").iterdir())) == 1
    acc = EventAccumulator(str(logdir / "cont"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/prose/delta_from_start", "eval/code/bpb"} <= set(acc.Tags()["scalars"])
    assert [s.step for s in acc.Scalars("train/loss")] == list(range(10, 101, 10))


def test_tensorboard_missing_is_a_clear_warning(lifecycle, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from tunelab.report import write_tensorboard

    said = []
    assert write_tensorboard([lifecycle["cont"]], tmp_path / "tb", warn=said.append) is None
    assert len(said) == 1 and "tensorboard is not installed" in said[0] and "tunelab[tensorboard]" in said[0]
    assert not (tmp_path / "tb").exists()


def test_the_report_imports_no_torch(lifecycle, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from tunelab.report import write_report; "
            f"write_report([{str(lifecycle['base'].parent)!r}], {str(tmp_path / 'r.html')!r}); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
