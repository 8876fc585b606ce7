"""`tunelab compare`: prints the forgetting table, data domains (rows) x runs (columns).

Each cell is a run's final evaluation of a domain (its last eval step in metrics.jsonl) and its
delta: from the same run's step-0 evaluation (what continued training changed), or, with a base
run, from the base's final evaluation of that domain. A positive delta on a reference domain (old
data) is forgetting; a negative delta on a target domain (data the run trains on) is a gain.

The table itself is built by the library (eval/relative.py `forgetting_table`, pure, which reports
draw too); `render_table` prints it.
"""

from __future__ import annotations

from tunelab.eval.relative import cell_text, format_value, render_summaries


# ---------------------------------------------------------------- printing


def render_table(table: dict, console=None) -> None:
    """Print the table, the per-run summary lines and the footnotes (rich; colours only on a terminal)."""
    from rich.table import Table

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
            line.append(format_value(table["base"]["values"].get(row["domain"])))
        line += [cell_text(row["cells"][run["name"]], role_mark=row["role"] == "mixed",
                           missing_delta=bool(run["has_start"] or table["base"]), colour_unknown=False)
                 for run in table["runs"]]
        grid.add_row(*line)
    console.print(grid)
    mixed = ["role mixed: the runs disagree; T/R after a value is the domain's role in that run"] \
        if any(r["role"] == "mixed" for r in table["rows"]) else []
    render_summaries(table, console, "run", no_deltas=True, notes=mixed)
