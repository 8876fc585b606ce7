"""Tables of each domain's change, domains (rows) x models (columns): pure, run directories or scores
in, a dict out (JSON-ready), so commands print them and reports draw them alike.

`forgetting_table`: runs' own logged evaluations (metrics.jsonl), each domain's final value and its
delta from the run's step 0, or from a base run's final value (`tunelab compare`, reports).
`relative_table`: several models scored on the same text now, each delta against a named base model
(`tunelab eval --base`); a model directory has no step, so `final_step` is the run's last step where
the model is a run's final/ or checkpoint, else None. Role per model and domain: `target` where the
model (or an ancestor since the base) trained on the source and the base did not, `reference`
otherwise (old or unseen text), as training tags its eval domains.

A positive delta on a reference domain (old data) is forgetting; a negative delta on a target domain
(data the run trains on) is a gain. Both tables fill their columns with `_fill_column`.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError, RunDirError
from tunelab.runs import read_metrics

METRICS = ("loss", "bpb")
ROLES = ("target", "reference")
ROLE_ORDER = {"target": 0, "reference": 1, "mixed": 2, "?": 3}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _row_role(roles) -> str:
    """A domain's role in the models that evaluate it: "mixed" if they disagree, "?" if none says."""
    known = set(roles) - {"?"}
    return known.pop() if len(known) == 1 else ("mixed" if known else "?")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")


def _fill_column(rows: list[dict], name: str, cells: dict[str, dict]) -> dict:
    """One model's column: cells (domain -> {"value", "from", "step", "role"}) into `rows` with their
    delta (value - from), its worst forgetting marked; returns the model's summary (mean_forgetting
    over reference domains, mean_gain = mean -delta over target domains, worst: the reference domain
    with the largest positive delta, the first such row on a tie)."""
    for row in rows:
        cell = cells.get(row["domain"])
        if cell is None:
            row["cells"][name] = None
            continue
        value, start = cell["value"], cell["from"]
        delta = value - start if value is not None and start is not None else None
        row["cells"][name] = {"value": value, "from": start, "delta": delta, "step": cell["step"],
                              "role": cell["role"], "worst": False}
    scored = [r["cells"][name] for r in rows if r["cells"][name] and r["cells"][name]["delta"] is not None]
    forgetting = [c for c in scored if c["role"] == "reference"]
    gains = [-c["delta"] for c in scored if c["role"] == "target"]
    worst = None
    if forgetting and max(c["delta"] for c in forgetting) > 0:
        cell = max(forgetting, key=lambda c: c["delta"])
        cell["worst"] = True
        worst = {"domain": next(r["domain"] for r in rows if r["cells"][name] is cell), "delta": cell["delta"]}
    return {"mean_forgetting": _mean([c["delta"] for c in forgetting]), "n_reference": len(forgetting),
            "mean_gain": _mean(gains), "n_target": len(gains), "worst": worst}


# ---------------------------------------------------------------- runs' logged evaluations


def run_evals(run: str | Path) -> dict:
    """The evaluations of one run directory, by domain: {"final": event, "start": step-0 event or None,
    "role": target | reference | "?"}. After a resume the re-run steps replace the logged ones.

    Raises RunDirError for a path that is not a run directory or a run without eval events.
    """
    path = Path(run).expanduser()
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        hint = ""
        for up in (path.parent, path.parent.parent):
            if (up / "metrics.jsonl").is_file():
                hint = f" (did you mean its run directory {up}?)"
                break
        what = "does not exist" if not path.exists() else "is not a run directory (no metrics.jsonl)"
        raise RunDirError(f"RUN: {run} {what}{hint}; give run directories such as runs/NAME, written by "
                          "tunelab pretrain/finetune")
    domains: dict[str, dict] = {}
    for event in read_metrics(metrics):
        if event.get("event") != "eval" or "domain" not in event:
            continue
        entry = domains.setdefault(event["domain"], {"final": None, "start": None, "role": "?"})
        if event.get("step") == 0 and entry["start"] is None:
            entry["start"] = event
        if entry["final"] is None or event.get("step", 0) >= entry["final"].get("step", 0):
            entry["final"] = event
        if event.get("role") in ROLES:
            entry["role"] = event["role"]
    if not domains:
        raise RunDirError(f"RUN: {run} has no eval events in metrics.jsonl yet (a run evaluates every "
                          "train.eval_every steps and at the end): let it finish or continue it with --resume, "
                          "or score its final/ with tunelab eval")
    return domains


def _run_labels(paths: list[Path]) -> list[str]:
    """Column names: the directory name, or the path as given where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def forgetting_table(runs: list[str | Path], base: str | Path | None = None, metric: str = "loss") -> dict:
    """The forgetting table of `runs` as plain data (JSON-ready).

    {"metric", "reference": "start" | "base",
     "base": None | {"name", "path", "final_step", "values": {domain: value}},
     "runs": [{"name", "path", "final_step", "has_start", "mean_forgetting", "n_reference",
               "mean_gain", "n_target", "worst": None | {"domain", "delta"}}],
     "rows": [{"domain", "role", "cells": {run name: None | {"value", "from", "delta", "step", "role",
               "worst"}}}],
     "footnotes": [str]}

    value: the run's last evaluation of the domain; from: what delta is measured from (the run's
    step-0 value, or the base's final value). Rows: every domain any run evaluated, in order of first
    appearance, grouped by role.
    """
    _check_metric(metric)
    if not runs:
        raise ConfigError("RUN: give at least one run directory")
    paths, seen = [], set()
    for run in runs:
        key = str(Path(run).expanduser().resolve())
        if key not in seen:
            seen.add(key)
            paths.append(Path(run))
    evals = [run_evals(p) for p in paths]
    base_evals = run_evals(base) if base is not None else None
    footnotes: list[str] = []

    base_info = None
    if base_evals is not None:
        base_info = {"name": Path(base).name or str(base), "path": str(base),
                     "final_step": max(e["final"].get("step", 0) for e in base_evals.values()),
                     "values": {d: e["final"].get(metric) for d, e in base_evals.items()}}
    order = list(dict.fromkeys(d for domains in evals for d in domains))
    row_roles = {d: _row_role(ev[d]["role"] for ev in evals if d in ev) for d in order}
    order.sort(key=lambda d: ROLE_ORDER[row_roles[d]])
    rows = [{"domain": d, "role": row_roles[d], "cells": {}} for d in order]

    run_infos = []
    for name, path, domains in zip(_run_labels(paths), paths, evals):
        final_step = max(e["final"].get("step", 0) for e in domains.values())
        has_start = any(e["start"] is not None for e in domains.values())
        if base_info is None and not has_start:
            footnotes.append(f"{name}: no step-0 evaluation (an older run, or one that did not evaluate "
                             "at start): no deltas; compare it with --base RUN instead")
        cells = {}
        for domain in order:
            entry = domains.get(domain)
            if entry is None:
                continue
            if base_info is not None:
                start = base_info["values"].get(domain)
            else:
                start = entry["start"].get(metric) if entry["start"] is not None else None
                if has_start and entry["start"] is None:
                    footnotes.append(f"{name}: {domain} has no step-0 evaluation (added later): no delta")
            step = entry["final"].get("step", 0)
            if step != final_step:
                footnotes.append(f"{name}: {domain} was last evaluated at step {step}, "
                                 f"the run's last evaluation is at step {final_step}")
            cells[domain] = {"value": entry["final"].get(metric), "from": start, "step": step, "role": entry["role"]}
        run_infos.append({"name": name, "path": str(path), "final_step": final_step, "has_start": has_start,
                          **_fill_column(rows, name, cells)})
    if base_info is not None:
        lacking = [r["domain"] for r in rows if r["domain"] not in base_info["values"]]
        if lacking:
            footnotes.append(f"base {base_info['name']} has no evaluation of {', '.join(lacking)}: no delta there")
    if any(r["role"] == "?" for r in rows):
        footnotes.append("role ?: the eval events carry no role (a run from before forgetting tracking)")
    return {"metric": metric, "reference": "base" if base_info else "start", "base": base_info,
            "runs": run_infos, "rows": rows, "footnotes": footnotes}


# ---------------------------------------------------------------- models scored now


def model_label(model_dir: str) -> str:
    """A column name: a run's final/ is the run's name, a checkpoint `run@step-N`, anything else its own name."""
    path = Path(model_dir)
    if path.name == "final" and (path.parent / "metrics.jsonl").is_file():
        return path.parent.name
    if path.parent.name == "checkpoints" and (path.parent.parent / "metrics.jsonl").is_file():
        return f"{path.parent.parent.name}@{path.name}"
    return path.name or str(model_dir)


def labels(model_dirs: list[str]) -> list[str]:
    names = [model_label(m) for m in model_dirs]
    return [n if names.count(n) == 1 else str(m) for n, m in zip(names, model_dirs)]


def model_step(model_dir: str) -> int | None:
    """The training step a model directory holds: a checkpoint's N, or its run's last logged step."""
    path = Path(model_dir)
    if path.parent.name == "checkpoints" and path.name.startswith("step-") and path.name[5:].isdigit():
        return int(path.name[5:])
    if path.name == "final" and (path.parent / "metrics.jsonl").is_file():
        steps = [e["step"] for e in read_metrics(path.parent / "metrics.jsonl") if "step" in e]
        return max(steps) if steps else None
    return None


def relative_table(results: dict[str, dict], paths: dict[str, str], roles: dict[str, dict[str, str]],
                   base: str | None = None, metric: str = "loss", footnotes: list[str] | None = None) -> dict:
    """results: model name -> {domain: evaluate_model's entry}; roles: model name -> {domain: role};
    base: the name (a key of results) deltas are measured from, or None (values only)."""
    _check_metric(metric)
    names = [n for n in results if n != base]
    domains = list(dict.fromkeys(d for r in results.values() for d in r))
    base_info = None
    if base is not None:
        base_info = {"name": base, "path": paths[base], "final_step": model_step(paths[base]),
                     "values": {d: e.get(metric) for d, e in results[base].items()}}
    rows = []
    for domain in domains:
        split = {results[n][domain].get("split") for n in results if domain in results[n]}
        role = _row_role(roles[n].get(domain, "?") for n in names if domain in results[n])
        rows.append({"domain": domain, "role": role, "split": split.pop() if len(split) == 1 else "mixed", "cells": {}})
    runs = []
    for name in names:
        step = model_step(paths[name])
        cells = {d: {"value": e.get(metric), "from": base_info["values"].get(d) if base_info else None, "step": step,
                     "role": roles[name].get(d, "?")} for d, e in results[name].items()}
        runs.append({"name": name, "path": paths[name], "final_step": step, "has_start": False,
                     **_fill_column(rows, name, cells)})
    return {"metric": metric, "reference": "base" if base_info else None, "base": base_info, "runs": runs,
            "rows": rows, "footnotes": list(footnotes or [])}


def format_value(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_summaries(table: dict, console, model: str, no_deltas: bool = False, notes: list[str] = ()) -> None:
    """Under a table: each model's line (mean forgetting and its worst domain, mean gain; `no_deltas`:
    say so where it has neither), the worst-forgetting note, `notes`, the table's footnotes."""
    for run in table["runs"]:
        parts = []
        if run["n_reference"]:
            worst = run["worst"]
            parts.append(f"forgetting {format_value(run['mean_forgetting'], True)} mean over {run['n_reference']} "
                         f"reference domain{'s' * (run['n_reference'] != 1)}"
                         + (f" (worst: {worst['domain']} {format_value(worst['delta'], True)})" if worst
                            else " (none forgotten)"))
        if run["n_target"]:
            parts.append(f"gain {format_value(run['mean_gain'], True)} mean over {run['n_target']} target "
                         f"domain{'s' * (run['n_target'] != 1)}")
        if parts or no_deltas:
            console.print(f"{run['name']}: " + ("; ".join(parts) or "no deltas"), markup=False, highlight=False)
    worst_note = [f"* worst forgetting of the {model} (largest rise on a reference domain)"] \
        if any(r["worst"] for r in table["runs"]) else []
    for note in worst_note + list(notes) + table["footnotes"]:
        console.print(note, style="dim", markup=False, highlight=False)


def cell_text(cell: dict | None, role_mark: bool = False, missing_delta: bool = False, colour_unknown: bool = True):
    """One printed cell: the value, its delta (red: rose, green: fell; higher is worse for loss and bpb alike)
    and the worst-forgetting star. `role_mark`: T/R after the value (a row whose runs disagree on its role);
    `missing_delta`: "(-)" where the column has deltas but this cell none; `colour_unknown`: colour the delta of
    a cell whose role is unknown too."""
    from rich.text import Text

    if cell is None or cell["value"] is None:
        return Text("-")
    text = Text(format_value(cell["value"]))
    if role_mark and cell["role"] in ROLES:
        text.append(f" {cell['role'][0].upper()}")
    if cell["delta"] is not None:
        coloured = colour_unknown or cell["role"] in ROLES
        style = ("red" if cell["delta"] > 0 else "green" if cell["delta"] < 0 else "") if coloured else ""
        text.append(f" ({format_value(cell['delta'], signed=True)})", style=style)
    elif missing_delta:
        text.append(" (-)")
    text.append(" *" if cell["worst"] else "  ", style="bold red")
    return text


def render_relative(table: dict, console=None) -> None:
    """Print the table (domains x models, delta from the base in brackets), per-model summaries, footnotes."""
    from rich.table import Table

    from tunelab.console import table_console

    console = console or table_console()
    base = table["base"]
    title = f"eval: {table['metric']}" + (f" (delta from base {base['name']})" if base else "")
    console.print(title, markup=False, highlight=False, style="bold")
    grid = Table()
    for col in ("domain", "role", "split"):
        grid.add_column(col, overflow="fold")  # names are never cut short ("quickstart-code…")
    if base:
        grid.add_column(f"base {base['name']}", justify="right", overflow="fold")
    for run in table["runs"]:
        grid.add_column(run["name"], justify="right", overflow="fold")
    for row in table["rows"]:
        line = [row["domain"], row["role"], row["split"]]
        if base:
            line.append(format_value(base["values"].get(row["domain"])))
        line += [cell_text(row["cells"][run["name"]]) for run in table["runs"]]
        grid.add_row(*line)
    console.print(grid)
    render_summaries(table, console, "model")
