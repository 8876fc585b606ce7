"""`tunelab compare`: a forgetting table, data domains (rows) x runs (columns).

Each cell is a run's final evaluation of a domain (its last eval step in metrics.jsonl) and its
delta: from the same run's step-0 evaluation (what continued training changed), or, with a base
run, from the base's final evaluation of that domain. A positive delta on a reference domain (old
data) is forgetting; a negative delta on a target domain (data the run trains on) is a gain.

`forgetting_table` is pure (run directories in, a dict out) so other reports can reuse it;
`render_table` prints it.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError, RunDirError
from tunelab.runs import read_metrics

METRICS = ("loss", "bpb")
ROLES = ("target", "reference")
ROLE_ORDER = {"target": 0, "reference": 1, "mixed": 2, "?": 3}


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


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _labels(paths: list[Path]) -> list[str]:
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
    step-0 value, or the base's final value); delta = value - from (None where there is none).
    mean_forgetting: mean delta over the run's reference domains (positive = forgot);
    mean_gain: mean of -delta over its target domains (positive = improved). worst: the reference
    domain with the largest positive delta (None if nothing was forgotten). A row's role is the
    domain's role in the runs that evaluate it ("mixed" if they disagree, "?" if no event says).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    if not runs:
        raise ConfigError("RUN: give at least one run directory")
    paths, seen = [], set()
    for run in runs:
        key = str(Path(run).expanduser().resolve())
        if key not in seen:
            seen.add(key)
            paths.append(Path(run))
    evals = [run_evals(p) for p in paths]
    names = _labels(paths)
    base_evals = run_evals(base) if base is not None else None
    footnotes: list[str] = []

    base_info = None
    if base_evals is not None:
        base_info = {"name": Path(base).name or str(base), "path": str(base),
                     "final_step": max(e["final"].get("step", 0) for e in base_evals.values()),
                     "values": {d: e["final"].get(metric) for d, e in base_evals.items()}}

    # Rows: every domain any run evaluated, in order of first appearance, grouped by role.
    order: list[str] = []
    for domains in evals:
        order += [d for d in domains if d not in order]
    row_roles = {}
    for domain in order:
        known = {ev[domain]["role"] for ev in evals if domain in ev} - {"?"}
        row_roles[domain] = known.pop() if len(known) == 1 else ("mixed" if known else "?")
    order.sort(key=lambda d: ROLE_ORDER[row_roles[d]])
    rows = [{"domain": d, "role": row_roles[d], "cells": {}} for d in order]

    run_infos = []
    for name, path, domains in zip(names, paths, evals):
        final_step = max(e["final"].get("step", 0) for e in domains.values())
        has_start = any(e["start"] is not None for e in domains.values())
        if base_info is None and not has_start:
            footnotes.append(f"{name}: no step-0 evaluation (an older run, or one that did not evaluate "
                             "at start): no deltas; compare it with --base RUN instead")
        for row in rows:
            entry = domains.get(row["domain"])
            if entry is None:
                row["cells"][name] = None
                continue
            value = entry["final"].get(metric)
            if base_info is not None:
                start = base_info["values"].get(row["domain"])
            else:
                start = entry["start"].get(metric) if entry["start"] is not None else None
                if has_start and entry["start"] is None:
                    footnotes.append(f"{name}: {row['domain']} has no step-0 evaluation (added later): no delta")
            delta = value - start if value is not None and start is not None else None
            step = entry["final"].get("step", 0)
            if step != final_step:
                footnotes.append(f"{name}: {row['domain']} was last evaluated at step {step}, "
                                 f"the run's last evaluation is at step {final_step}")
            row["cells"][name] = {"value": value, "from": start, "delta": delta, "step": step,
                                  "role": entry["role"], "worst": False}
        scored = [r["cells"][name] for r in rows if r["cells"][name] and r["cells"][name]["delta"] is not None]
        forgetting = [c for c in scored if c["role"] == "reference"]
        gains = [-c["delta"] for c in scored if c["role"] == "target"]
        worst = None
        if forgetting and max(c["delta"] for c in forgetting) > 0:
            cell = max(forgetting, key=lambda c: c["delta"])  # the first such row on a tie
            cell["worst"] = True
            worst = {"domain": next(r["domain"] for r in rows if r["cells"][name] is cell), "delta": cell["delta"]}
        run_infos.append({"name": name, "path": str(path), "final_step": final_step, "has_start": has_start,
                          "mean_forgetting": _mean([c["delta"] for c in forgetting]), "n_reference": len(forgetting),
                          "mean_gain": _mean(gains), "n_target": len(gains), "worst": worst})
    if base_info is not None:
        lacking = [r["domain"] for r in rows if r["domain"] not in base_info["values"]]
        if lacking:
            footnotes.append(f"base {base_info['name']} has no evaluation of {', '.join(lacking)}: no delta there")
    if any(r["role"] == "?" for r in rows):
        footnotes.append("role ?: the eval events carry no role (a run from before forgetting tracking)")
    return {"metric": metric, "reference": "base" if base_info else "start", "base": base_info,
            "runs": run_infos, "rows": rows, "footnotes": footnotes}


# ---------------------------------------------------------------- printing


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_table(table: dict, console=None) -> None:
    """Print the table, the per-run summary lines and the footnotes (rich; colours only on a terminal)."""
    from rich.table import Table
    from rich.text import Text

    from tunelab.console import table_console

    console = console or table_console()
    metric = table["metric"]
    against = f"base {table['base']['name']}" if table["base"] else "each run's step 0"
    console.print(f"forgetting: final {metric} (delta from {against})", markup=False, highlight=False, style="bold")
    grid = Table()
    grid.add_column("domain", overflow="fold")  # names are never cut short ("quickstart-code…")
    grid.add_column("role", overflow="fold")
    if table["base"]:
        grid.add_column(f"base {table['base']['name']}\n@{table['base']['final_step']}", justify="right",
                        overflow="fold")
    for run in table["runs"]:
        grid.add_column(f"{run['name']}\n@{run['final_step']}", justify="right", overflow="fold")
    for row in table["rows"]:
        line = [row["domain"], row["role"]]
        if table["base"]:
            line.append(_num(table["base"]["values"].get(row["domain"])))
        for run in table["runs"]:
            cell = row["cells"][run["name"]]
            if cell is None or cell["value"] is None:
                line.append(Text("-"))
                continue
            text = Text(_num(cell["value"]))
            if row["role"] == "mixed" and cell["role"] in ROLES:
                text.append(f" {cell['role'][0].upper()}")
            if cell["delta"] is not None:
                known = cell["role"] in ROLES  # higher is worse for loss and bpb alike
                style = ("red" if cell["delta"] > 0 else "green" if cell["delta"] < 0 else "") if known else ""
                text.append(f" ({_num(cell['delta'], signed=True)})", style=style)
            elif run["has_start"] or table["base"]:
                text.append(" (-)")
            text.append(" *" if cell["worst"] else "  ", style="bold red")
            line.append(text)
        grid.add_row(*line)
    console.print(grid)
    for run in table["runs"]:
        if run["n_reference"] == 0 and run["n_target"] == 0:
            console.print(f"{run['name']}: no deltas", markup=False, highlight=False)
            continue
        parts = []
        if run["n_reference"]:
            worst = run["worst"]
            parts.append(f"forgetting {_num(run['mean_forgetting'], True)} mean over {run['n_reference']} reference "
                         f"domain{'s' * (run['n_reference'] != 1)}"
                         + (f" (worst: {worst['domain']} {_num(worst['delta'], True)})" if worst else " (none forgotten)"))
        if run["n_target"]:
            parts.append(f"gain {_num(run['mean_gain'], True)} mean over {run['n_target']} target "
                         f"domain{'s' * (run['n_target'] != 1)}")
        console.print(f"{run['name']}: " + "; ".join(parts), markup=False, highlight=False)
    notes = []
    if any(r["worst"] for r in table["runs"]):
        notes.append("* worst forgetting of the run (largest rise on a reference domain)")
    if any(r["role"] == "mixed" for r in table["rows"]):
        notes.append("role mixed: the runs disagree; T/R after a value is the domain's role in that run")
    for note in notes + table["footnotes"]:
        console.print(note, style="dim", markup=False, highlight=False)
