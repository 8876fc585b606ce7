"""`tunelab report`: one static HTML page across runs (curves, tables, the lineage graph).

    write_report(["runs/quickstart", "runs/quickstart-code"], "report.html")

Reads run directories only (metrics.jsonl, config.yaml, env.json, lineage.json; a merge's
merge.json): no torch, no model is loaded. The page is self-contained: inline SVG drawn here
(svg.py, lineage.py), inline CSS, no script, nothing fetched (html.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["write_report", "write_tensorboard"]


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def write_report(runs: list[str | Path], out: str | Path, *, title: str | None = None, eval_stages: list = (),
                 warn=_stderr_warn) -> Path:
    """Write the report of `runs` (run directories, folders holding runs, globs) to `out`; returns its path.

    eval_stages: collect.EvalStage records of a pipeline's eval stages (their model is known there).
    Problems that do not stop the report (a cut-off metrics line, a run without metrics, runs with
    different tokenizers) are passed to `warn` and listed at the top of the page.
    """
    from tunelab.eval.relative import forgetting_table
    from tunelab.report import html
    from tunelab.report.collect import expand, load
    from tunelab.report.lineage import build_graph, render_svg
    from tunelab.runs import atomic_write

    if not runs and not eval_stages:
        raise ConfigError("RUN: give at least one run directory")
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    paths, found_evals = expand(list(runs), warn) if runs else ([], [])
    entries = load(paths, note)
    eval_stages = list(eval_stages) + found_evals
    scored = [e for e in entries if e.evals]

    # Loss per token compares models only when they cut text into the same tokens: otherwise bits per byte.
    groups: dict[str, list] = {}
    for entry in (e for e in entries if e.has_metrics):
        groups.setdefault(entry.tokenizer or "unknown", []).append(entry)
    known = [fp for fp in groups if fp != "unknown"]
    metric = "loss"
    if len(known) > 1:
        metric = "bpb"
        note("these runs use different tokenizers (" + "; ".join(
            f"{', '.join(e.label for e in groups[fp])}: {fp[:8]}" for fp in known)
            + "): loss per token is not comparable across them, so evaluations are compared in bits per byte "
              "and training loss is plotted per tokenizer")

    out = Path(out).expanduser()
    shown = html.PathRule(out.parent, entries)
    sections = [("runs", "Runs", html.runs_table(entries)
                 + '<p class="note">parameters and trainable: counted when the run started (older runs: from the '
                   'saved weights); tokens/s: median over log intervals, evaluation excluded; wall time: the '
                   'run\'s working time, evaluation included, time between a crash and its resume excluded.</p>')]
    if scored:
        by_path = {str(e.path): e for e in scored}
        main = html.final_table(forgetting_table([e.path for e in scored], metric=metric), by_path)
        if metric == "loss" and any(ev.get("bpb") is not None for e in scored for v in e.evals.values() for ev in v):
            main += ("<details><summary>the same in bits per byte (comparable across tokenizers)</summary>"
                     + html.final_table(forgetting_table([e.path for e in scored], metric="bpb"), by_path)
                     + "</details>")
        sections.append(("final", "Final evaluation", main))
    training = html.training_plots(entries, {fp: members for fp, members in groups.items()})
    if training:
        sections.append(("training", "Training", f'<div class="plots">{training}</div>'))
    evals = html.eval_plots(scored, metric)
    if evals:
        sections.append(("evaluation", "Evaluation", '<p class="note">Held-out evaluations during training, per '
                         'domain; target = trained on by that run, reference = old data.</p>'
                         f'<div class="plots">{evals}</div>'))
    forgetting = html.forgetting_plots(scored, metric)
    if forgetting:
        sections.append(("forgetting", "Forgetting", '<p class="note">Change on each reference domain since the '
                         "run's step-0 evaluation: above 0 the run has forgotten part of what it knew.</p>"
                         f'<div class="plots">{forgetting}</div>'))
    graph = build_graph(entries, eval_stages)
    sections.append(("lineage", "Lineage", '<p class="graph-key">Parents point to what was made from them. '
                     "Solid boxes: runs in this report (click for details); dashed boxes: ancestors outside it; "
                     "yellow: data (content hash), a dashed yellow edge = trained on (replay: named); blue: eval "
                     "stages. Edge labels: the parent's role and the hash the child recorded for it (weights "
                     "sha256, first 8 hex digits); a faded edge: a merge input left out.</p>"
                     f'<div class="graph-wrap">{render_svg(graph)}</div>'))
    if eval_stages:
        sections.append(("eval-stages", "Eval stages", html.eval_stages_table(eval_stages, shown)))
    sections.append(("details", "Run details", "".join(html.run_section(e, shown) for e in entries)))

    labels = [e.label for e in entries]
    title = title or "tunelab report: " + ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
    from importlib.metadata import PackageNotFoundError, version

    try:
        version_text = f"tunelab {version('tunelab')}"
    except PackageNotFoundError:
        version_text = "tunelab"
    footer = (f"{version_text} · {len(entries)} run{'s' * (len(entries) != 1)} · x axis: step = the run's optimizer "
              "steps, tokens = the tokens it trained on (each run counts from 0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, html.page(title, sections, warnings, footer))
    return out


def write_tensorboard(runs: list[str | Path], logdir: str | Path, warn=_stderr_warn) -> Path | None:
    """metrics.jsonl events as TensorBoard scalars, one subfolder per run; None (with a warning) when the
    tensorboard package is not installed."""
    from tunelab.report.tensorboard import export

    return export(runs, logdir, warn)
