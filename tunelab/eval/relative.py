"""Several models scored on the same text, each domain's change against a named base model.

The table has the shape of `tunelab.compare.forgetting_table` (rows of domains, a cell per model with
value / from / delta / role / worst, a summary per model), so a report can draw both alike; a model
directory has no step, so `final_step` is the run's last step where the model is a run's final/ or
checkpoint, else None. Role per model and domain: `target` where the model (or an ancestor since the
base) trained on the source and the base did not, `reference` otherwise (old or unseen text), as
training tags its eval domains. A positive delta on a reference domain is forgetting.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError

METRICS = ("loss", "bpb")


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
        from tunelab.runs import read_metrics

        steps = [e["step"] for e in read_metrics(path.parent / "metrics.jsonl") if "step" in e]
        return max(steps) if steps else None
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def relative_table(results: dict[str, dict], paths: dict[str, str], roles: dict[str, dict[str, str]],
                   base: str | None = None, metric: str = "loss", footnotes: list[str] | None = None) -> dict:
    """results: model name -> {domain: evaluate_model's entry}; roles: model name -> {domain: role};
    base: the name (a key of results) deltas are measured from, or None (values only)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    names = [n for n in results if n != base]
    domains = list(dict.fromkeys(d for r in results.values() for d in r))
    base_info = None
    if base is not None:
        base_info = {"name": base, "path": paths[base], "final_step": model_step(paths[base]),
                     "values": {d: e.get(metric) for d, e in results[base].items()}}
    rows = []
    for domain in domains:
        known = {roles[n].get(domain, "?") for n in names if domain in results[n]} - {"?"}
        role = known.pop() if len(known) == 1 else ("mixed" if known else "?")
        split = {results[n][domain].get("split") for n in results if domain in results[n]}
        rows.append({"domain": domain, "role": role, "split": split.pop() if len(split) == 1 else "mixed",
                     "cells": {}})
    runs = []
    for name in names:
        for row in rows:
            entry = results[name].get(row["domain"])
            if entry is None:
                row["cells"][name] = None
                continue
            value = entry.get(metric)
            start = base_info["values"].get(row["domain"]) if base_info else None
            delta = value - start if value is not None and start is not None else None
            row["cells"][name] = {"value": value, "from": start, "delta": delta, "step": model_step(paths[name]),
                                  "role": roles[name].get(row["domain"], "?"), "worst": False}
        scored = [r["cells"][name] for r in rows if r["cells"][name] and r["cells"][name]["delta"] is not None]
        forgetting = [c for c in scored if c["role"] == "reference"]
        gains = [-c["delta"] for c in scored if c["role"] == "target"]
        worst = None
        if forgetting and max(c["delta"] for c in forgetting) > 0:
            cell = max(forgetting, key=lambda c: c["delta"])
            cell["worst"] = True
            worst = {"domain": next(r["domain"] for r in rows if r["cells"][name] is cell), "delta": cell["delta"]}
        runs.append({"name": name, "path": paths[name], "final_step": model_step(paths[name]), "has_start": False,
                     "mean_forgetting": _mean([c["delta"] for c in forgetting]), "n_reference": len(forgetting),
                     "mean_gain": _mean(gains), "n_target": len(gains), "worst": worst})
    return {"metric": metric, "reference": "base" if base_info else None, "base": base_info, "runs": runs,
            "rows": rows, "footnotes": list(footnotes or [])}


def _num(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def render_relative(table: dict, console=None) -> None:
    """Print the table (domains x models, delta from the base in brackets), per-model summaries, footnotes."""
    from rich.table import Table
    from rich.text import Text

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
            line.append(_num(base["values"].get(row["domain"])))
        for run in table["runs"]:
            cell = row["cells"][run["name"]]
            if cell is None or cell["value"] is None:
                line.append(Text("-"))
                continue
            text = Text(_num(cell["value"]))
            if cell["delta"] is not None:
                style = "red" if cell["delta"] > 0 else "green" if cell["delta"] < 0 else ""
                text.append(f" ({_num(cell['delta'], signed=True)})", style=style)
            text.append(" *" if cell["worst"] else "  ", style="bold red")
            line.append(text)
        grid.add_row(*line)
    console.print(grid)
    for run in table["runs"]:
        parts = []
        if run["n_reference"]:
            worst = run["worst"]
            parts.append(f"forgetting {_num(run['mean_forgetting'], True)} mean over {run['n_reference']} reference "
                         f"domain{'s' * (run['n_reference'] != 1)}"
                         + (f" (worst: {worst['domain']} {_num(worst['delta'], True)})" if worst else " (none forgotten)"))
        if run["n_target"]:
            parts.append(f"gain {_num(run['mean_gain'], True)} mean over {run['n_target']} target "
                         f"domain{'s' * (run['n_target'] != 1)}")
        if parts:
            console.print(f"{run['name']}: " + "; ".join(parts), markup=False, highlight=False)
    notes = ["* worst forgetting of the model (largest rise on a reference domain)"] \
        if any(r["worst"] for r in table["runs"]) else []
    for note in notes + table["footnotes"]:
        console.print(note, style="dim", markup=False, highlight=False)
