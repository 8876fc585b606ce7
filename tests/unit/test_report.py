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
from report_runs import TOKENIZER, curve, make_lifecycle, make_many, write_run
from tunelab.errors import RunDirError
from tunelab.report import write_report
from tunelab.report.collect import EvalStage, expand, load, objective_of, summary, wall_seconds
from tunelab.report.lineage import build_graph, render_svg
from tunelab.report.svg import fmt, line_plot, nice_ticks, text_width
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


# ---------------------------------------------------------------- issue 27: what a new user met


def test_a_glob_skips_what_is_not_a_run_and_an_explicit_non_run_stays_an_error(lifecycle, tmp_path):
    root = lifecycle["base"].parent
    (root / "pipe-report.html").write_text("<html></html>")  # written beside the runs, as the quickstart does
    (root / "notes").mkdir()
    said = []
    paths, evals = expand([f"{root}/*"], warn=said.append)
    assert [p.name for p in paths] == ["base", "cont", "lora", "final"] and [e.name for e in evals] == ["score"]
    assert said == [f"{root}/*: skipped what is not a run directory: notes, pipe-report.html"]
    ok = run_cli("report", f"{root}/*", "-o", str(tmp_path / "r.html"))
    assert ok.returncode == 0, ok.stderr
    assert "skipped what is not a run directory: notes, pipe-report.html" in ok.stderr
    for explicit in (root / "notes", root / "pipe-report.html"):
        bad = run_cli("report", str(explicit), "-o", str(tmp_path / "r2.html"))
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
        assert "is not a run directory" in bad.stderr
    with pytest.raises(RunDirError, match="matches no run directory"):
        expand([f"{root}/*.html"])


def test_a_pruned_model_counts_its_weights_not_its_masks(tmp_path):
    runs = make_many(tmp_path / "runs")
    entry = load([runs["pruned"]], print)[0]
    assert summary(entry)["parameters"] == 926_336  # masks.safetensors (401,408 entries) is not counted
    page, _ = _report([runs["pruned"]], tmp_path / "r.html")
    assert '<td class="num">926,336</td>' in page and "1,327,744" not in page


def test_objective_of_reads_both_config_shapes():
    assert objective_of({"objective": {"name": "dpo", "options": {"beta": 0.1}}, "method": {"name": "lora"}}) == "dpo"
    assert objective_of({"method": {"name": "dpo", "options": {"tuning": {"name": "lora"}}},
                         "train": {"objective": "clm"}}) == "dpo"  # written before `objective:` existed
    assert objective_of({"method": {"name": "full"}, "train": {"objective": "mlm"}}) == "mlm"
    assert objective_of({"method": {"name": "lora"}}) == "clm" and objective_of({}) == "clm"


def test_each_objective_gets_its_own_loss_plot_labelled_with_what_it_is(tmp_path):
    runs = make_many(tmp_path / "runs")
    page, _ = _report([runs[k] for k in ("base-prose-pretrain", "dpo-old-shape", "simpo-new-shape", "mlm-encoder")],
                      tmp_path / "r.html")
    figures = re.findall(r'<figure><figcaption>Training loss.*?</figure>', page, flags=re.S)
    captions = [re.search(r"<figcaption>(.*?)</figcaption>", f).group(1) for f in figures]
    assert [c.split(" <span")[0] for c in captions] == ["Training loss: clm", "Training loss: dpo",
                                                         "Training loss: simpo", "Training loss: mlm"]
    units = [set(re.findall(r'class="axis-label"[^>]*rotate\(-90\)[^>]*>([^<]+)<', f)) for f in figures]
    assert units == [{"loss (nats/token)"}, {"DPO loss (per pair)"}, {"SimPO loss (per pair)"},
                     {"masked-token loss (nats/token)"}]
    assert "dpo-old-shape" not in figures[0] and "base-prose-pretrain" not in figures[1]  # never on one axis
    assert "reward margin" in captions[1]
    assert re.search(r"0\.\d{4} \(dpo\)</td>", page)  # the runs table says what the final train loss is


def test_y_axis_title_clears_the_widest_tick_label():
    plot = line_plot([{"name": "lr", "color": "#000", "points": [(s, 3e-3 * (1 - s / 120)) for s in range(10, 101, 10)]}],
                     "step", "learning rate")
    ticks = re.findall(r'<text class="tick" x="([\d.]+)" y="[\d.]+" text-anchor="end">([^<]+)<', plot)
    assert any(len(text) >= 6 for _, text in ticks), ticks  # 0.0025: the labels that used to run into the title
    title_x = float(re.search(r'translate\(([\d.]+) [\d.]+\) rotate\(-90\)', plot).group(1))
    assert min(float(x) - text_width(text) for x, text in ticks) >= title_x + 4 + 6
    assert text_width("0.0025") > 0.56 * 12 * 5  # generous: a real glyph is at most ~0.56 em wide


def test_paths_follow_one_rule_and_an_eval_stage_links_the_model_its_eval_json_names(tmp_path):
    runs = make_many(tmp_path / "runs")
    elsewhere = write_run(tmp_path / "elsewhere" / "run", curve(20, 10, 20, {"prose": ("target", 6.0, 4.0)}),
                          {"parents": [{"role": "init", "kind": "local", "path": str(tmp_path / "hub" / "model")}],
                           "tokenizer": {"fingerprint": TOKENIZER}})
    page, _ = _report([str(tmp_path / "runs" / "*"), elsewhere], tmp_path / "runs" / "report.html")
    details = page[page.index('<h2 id="details">'):]
    facts = re.findall(r"<dt>(directory|from)</dt><dd>(.*?)</dd>", details)
    shown = [re.sub(r"<[^>]+>", "", value) for _, value in facts]
    # A run in the report: by its name, linked to its details; any other path: relative to the report's folder
    # when inside it, else absolute. Never the absolute path of something inside the report's folder.
    assert shown[:4] == ["base-prose-pretrain", "init: llama-tiny", "continued-code-plain",
                         "init: base-prose-pretrain 5769a1f0da35"]
    assert '<dd>init: <a class="run" href="#run-0">' in details
    assert "pruned/final" in shown and "soup/final" in shown
    inside = str((tmp_path / "runs").resolve())
    assert not any(inside in value for value in shown)
    assert str(elsewhere.resolve()) in shown and f"init: {tmp_path.resolve() / 'hub' / 'model'}" in shown
    # The eval stage's eval.json names the pruned model: drawn as an edge, with the weights hash it recorded.
    assert (str(runs["pruned"].resolve()), "eval:score") in _drawn_edges(page)
    assert "score scored" in page and "not recorded" not in page


def test_eval_record_names_the_model_scored(tmp_path):
    from tunelab.commands.evaluate import eval_record
    from tunelab.runs import weight_files_sha256

    runs = make_lifecycle(tmp_path / "pipe")
    record = eval_record({"prose": {"loss": 4.0}}, str(runs["soup"]))
    assert record["prose"] == {"loss": 4.0}
    assert record["model"] == {"path": str(runs["soup"].resolve()), "weights_sha256": weight_files_sha256(runs["soup"])}
    stage = EvalStage("score", json.loads(json.dumps(record)))
    assert stage.model == str(runs["soup"].resolve()) and set(stage.results) == {"prose"}


def test_lineage_edge_labels_cover_neither_each_other_nor_nodes(tmp_path):
    """The layout's own arithmetic (the browser test measures the drawn boxes): 14 runs, a merge of checkpoints
    whose labels are wider than the gap between columns."""
    runs = make_many(tmp_path / "runs")
    graph = build_graph(load(expand([str(tmp_path / "runs" / "*")])[0], print))
    svg = render_svg(graph)
    nodes = [tuple(map(float, m)) for m in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="168" height="54"', svg)]
    nodes = [(x, y, x + 168, y + 54) for x, y in nodes]
    labels = []
    for text in re.findall(r'<text class="edge-label"[^>]*>(.*?)</text>', svg):
        lines = re.findall(r'<tspan x="([\d.]+)" y="([\d.]+)" class="\w+">([^<]*)</tspan>', text)
        width = max(len(line) for _, _, line in lines) * 6.1  # a glyph of these fonts: at most ~0.56 em
        cx, first, last = float(lines[0][0]), float(lines[0][1]), float(lines[-1][1])
        labels.append((cx - width / 2, first - 10, cx + width / 2, last + 3))
    assert len(labels) >= 14 and any("@step" in t for t in re.findall(r"<tspan[^>]*>([^<]*)<", svg))
    assert str(runs["soup"].resolve().parent) in svg  # the merge is in the graph
    for i, a in enumerate(labels):
        assert not any(_boxes_overlap(a, b) for b in labels[i + 1:] + nodes), a


def _boxes_overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
