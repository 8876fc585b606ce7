"""The report page: one static HTML file, its plots inline SVG, its only interaction plain HTML/CSS.

The x-axis switch (steps / tokens) is a pair of radio buttons whose state CSS reads (`:checked ~`),
so the page needs no script at all; every plot is drawn twice and one of the two is hidden.
Each run's resolved config, lineage.json and env.json sit in <details> one click away.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from tunelab import lineage
from tunelab.report import svg
from tunelab.report.collect import Entry, EvalStage, summary

LOSS_UNIT = "loss (nats/token)"
BPB_UNIT = "bits per byte"
X_AXES = (("step", "step", "step"), ("tokens", "tokens", "tokens (trained by the run)"))

CSS = (Path(__file__).parent / "page.css").read_text()  # inlined: the page fetches nothing


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _swatch(entry: Entry) -> str:
    color, dash = svg.style_of(entry.index)
    return f'<span class="swatch{" dashed" if dash else ""}" style="border-color:{color}"></span>'


def _run_link(entry: Entry) -> str:
    return f'<a class="run" href="#{entry.anchor}">{_swatch(entry)}{escape(entry.label)}</a>'


# ---------------------------------------------------------------- plots


def _figure(title: str, note: str, series_of, y_label: str, entries: list[Entry], zero_line: bool = False) -> str:
    """A figure with the same plot against steps and against tokens; series_of(entry, x) -> points."""
    variants, shown = [], []
    for x, _, x_label in X_AXES:
        series = []
        for entry in entries:
            points = series_of(entry, x)
            if points:
                color, dash = svg.style_of(entry.index)
                series.append({"name": entry.label, "color": color, "dash": dash, "points": points,
                               "markers": len(points) <= 40 and getattr(series_of, "markers", False)})
                if x == "step":
                    shown.append(entry)
        drawn = svg.line_plot(series, x_label, y_label, zero_line=zero_line, aria=f"{title} by {x}")
        if not drawn:
            if x == "step":
                return ""
            drawn = '<p class="note">These events carry no token counts.</p>'
        variants.append(f'<div class="x-{x}">{drawn}</div>')
    legend = "".join(f"<li>{_swatch(e)}{escape(e.label)}</li>" for e in shown)
    note_html = f' <span class="muted">{escape(note)}</span>' if note else ""
    return (f'<figure><figcaption>{escape(title)}{note_html}</figcaption>{"".join(variants)}'
            f'<ul class="legend">{legend}</ul></figure>')


def _train_series(key: str):
    def points(entry: Entry, x: str):
        return [(e.get(x), e.get(key)) for e in entry.train if e.get(key) is not None]
    return points


def _eval_series(domain: str, key: str, role: str | None = None):
    def points(entry: Entry, x: str):
        events = entry.evals.get(domain, [])
        if role is not None:
            events = [e for e in events if e.get("role") == role]
        return [(e.get(x), e.get(key)) for e in events if e.get(key) is not None]
    points.markers = True
    return points


# What a run's training loss is, by objective: (caption, y-axis title). The number differs in kind between
# them (a preference loss is per pair, ~0.69 at the start), so each objective gets its own plot.
OBJECTIVE_LOSS = {"clm": ("next-token cross-entropy", LOSS_UNIT),
                  "mlm": ("masked-token cross-entropy", "masked-token loss (nats/token)"),
                  "dpo": ("DPO: −log σ(β · reward margin vs the reference), mean over pairs", "DPO loss (per pair)"),
                  "simpo": ("SimPO: −log σ(β · length-normalised margin − γ), mean over pairs", "SimPO loss (per pair)"),
                  "orpo": ("ORPO: chosen NLL per token + β · odds-ratio loss", "ORPO loss (NLL + β·OR)")}


def training_plots(entries: list[Entry], groups: dict[str, list[Entry]]) -> str:
    """Training loss per (objective, tokenizer), never overlaid across them; LR, gradient norm, throughput."""
    figures = []
    objectives = list(dict.fromkeys(e.objective or "clm" for e in entries if e.has_metrics))
    for objective in objectives:
        what, unit = OBJECTIVE_LOSS.get(objective, (f"{objective} objective", f"{objective} loss"))
        for fingerprint, members in groups.items():
            members = [e for e in members if (e.objective or "clm") == objective]
            notes = [what] if objective != "clm" or len(objectives) > 1 else []
            notes += [f"tokenizer {fingerprint[:8]}"] if len(groups) > 1 else []
            title = "Training loss" + (f": {objective}" if len(objectives) > 1 else "")
            if members:
                figures.append(_figure(title, "; ".join(notes), _train_series("loss"), unit, members))
    figures.append(_figure("Learning rate schedule", "", _train_series("lr"), "learning rate", entries))
    figures.append(_figure("Gradient norm", "before clipping", _train_series("grad_norm"),
                           "global gradient norm (L2)", entries))
    figures.append(_figure("Throughput", "per log interval, evaluation excluded", _train_series("tokens_per_s"),
                           "tokens/s", entries))
    return "".join(f for f in figures if f)


def _roles(entries: list[Entry], domain: str) -> str:
    roles = {}
    for e in entries:
        events = e.evals.get(domain, [])
        if events and events[-1].get("role"):
            roles.setdefault(events[-1]["role"], []).append(e.label)
    if len(roles) == 1:
        return next(iter(roles))
    return "; ".join(f"{role} in {', '.join(names)}" for role, names in roles.items())


def eval_plots(entries: list[Entry], metric: str) -> str:
    domains = []
    for e in entries:
        domains += [d for d in e.evals if d not in domains]
    unit = LOSS_UNIT if metric == "loss" else BPB_UNIT
    title = "held-out loss" if metric == "loss" else "held-out bits per byte"
    return "".join(_figure(f"{domain}: {title}", _roles(entries, domain), _eval_series(domain, metric), unit, entries)
                   for domain in domains)


def forgetting_plots(entries: list[Entry], metric: str) -> str:
    """One plot per reference domain: the change since the run's step-0 evaluation (above 0: forgotten)."""
    key = "delta_from_start" if metric == "loss" else "bpb_delta_from_start"
    unit = "Δ loss since step 0 (nats/token)" if metric == "loss" else "Δ bits per byte since step 0"
    domains = []
    for e in entries:
        for domain, events in e.evals.items():
            if domain not in domains and any(ev.get("role") == "reference" and ev.get(key) is not None for ev in events):
                domains.append(domain)
    return "".join(_figure(f"{domain}: forgetting", "reference domain; above 0 = worse than at the start",
                           _eval_series(domain, key, role="reference"), unit, entries, zero_line=True)
                   for domain in domains)


# ---------------------------------------------------------------- tables


def runs_table(entries: list[Entry]) -> str:
    head = ("run", "stage", "method", "parameters", "trainable", "steps", "tokens", "wall time", "tokens/s",
            "precision", "final train loss", "tokenizer")
    numeric = {"parameters", "trainable", "steps", "tokens", "wall time", "tokens/s", "final train loss"}
    rows = []
    for entry in entries:
        s = summary(entry)
        badge = "" if entry.has_metrics or entry.op_record else '<span class="badge">no metrics</span>'
        cells = [f"{_run_link(entry)}{badge}", escape(s["stage"] or "–"), escape(s["method"] or "–"),
                 _int(s["parameters"]), _int(s["trainable"]), _int(s["steps"]), _int(s["tokens"]),
                 _duration(s["wall_s"]), _int(s["tokens_per_s"]), escape(s["precision"] or "–"),
                 _num(s["train_loss"]) + (f" ({escape(entry.objective)})" if entry.objective not in (None, "clm") else ""),
                 f'<span class="mono">{escape((s["tokenizer"] or "–")[:8])}</span>']
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' if h in numeric else f"<td>{c}</td>"
                                     for h, c in zip(head, cells)) + "</tr>")
    header = "".join(f'<th class="num">{h}</th>' if h in numeric else f"<th>{h}</th>" for h in head)
    return f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def final_table(table: dict, entries_by_path: dict[str, Entry]) -> str:
    """eval.relative.forgetting_table as HTML: per domain, each run's last evaluation and its change since step 0."""
    metric = table["metric"]
    runs = table["runs"]
    head = '<th>domain</th><th>role</th>' + "".join(
        f'<th class="num">{_run_link(entries_by_path[r["path"]])} <span class="muted">@{r["final_step"]}</span></th>'
        for r in runs)
    rows = []
    for row in table["rows"]:
        cells = [f"<td>{escape(row['domain'])}</td>", f"<td>{escape(row['role'])}</td>"]
        for r in runs:
            cell = row["cells"].get(r["name"])
            if cell is None or cell["value"] is None:
                cells.append('<td class="num">–</td>')
                continue
            delta = cell["delta"]
            if not (r["has_start"] or table["base"]):  # a run with nothing to measure from: no delta column
                delta_html = ""
            elif delta is None:
                delta_html = '<span class="delta"></span>'
            else:
                known = cell["role"] in ("target", "reference")
                cls = ("up" if delta > 0 else "down" if delta < 0 else "") if known else ""
                delta_html = f'<span class="delta {cls}">({delta:+.4f})</span>'
            star = '<span class="star" title="worst forgetting of the run">*</span>' if cell["worst"] \
                else '<span class="star"></span>'
            cells.append(f'<td class="num">{cell["value"]:.4f} <span class="nowrap">{delta_html}{star}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    summaries = []
    for r in runs:
        parts = []
        if r["n_reference"]:
            parts.append(f"forgetting {r['mean_forgetting']:+.4f}")
        if r["n_target"]:
            parts.append(f"gain {r['mean_gain']:+.4f}")
        summaries.append(f'<td class="num">{"<br>".join(escape(x) for x in parts) or "no deltas"}</td>')
    rows.append('<tr class="summary"><td colspan="2">mean over domains</td>' + "".join(summaries) + "</tr>")
    unit = LOSS_UNIT if metric == "loss" else BPB_UNIT
    notes = [f"Each cell: the run's last evaluation ({unit}) and, in brackets, its change since the run's step-0 "
             "evaluation: red = worse (forgetting on a reference domain), green = better. "
             "* = the run's worst forgetting."]
    notes += table["footnotes"]
    return (f'<div class="table-wrap"><table class="final"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            + "".join(f'<p class="note">{escape(n)}</p>' for n in notes))


def _scores_table(columns: dict[str, dict], metrics=("loss", "bpb")) -> str:
    """Domains (rows) x models (columns): {column: {domain: {"loss", "bpb", ...}}}."""
    domains = []
    for results in columns.values():
        domains += [d for d in results if d not in domains and isinstance(results[d], dict)]
    head = "<th>domain</th>" + "".join(f'<th class="num">{escape(name)} {m}</th>' for name in columns for m in metrics)
    rows = []
    for domain in domains:
        cells = [f"<td>{escape(domain)}</td>"]
        for results in columns.values():
            value = results.get(domain) if isinstance(results.get(domain), dict) else {}
            cells += [f'<td class="num">{_num(value.get(m))}</td>' for m in metrics]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def eval_stages_table(stages: list[EvalStage], shown: PathRule) -> str:
    columns = {s.name: s.results for s in stages}
    note = "".join(f'<p class="note">{escape(s.name)} scored '
                   + (shown.parent({"path": s.model}) if s.model else "a model not recorded (an older eval.json)")
                   + (f' <span class="muted mono">{escape(s.model_sha256[:12])}</span>' if s.model_sha256 else "")
                   + "</p>" for s in stages)
    return _scores_table(columns) + note


# ---------------------------------------------------------------- per-run details


class PathRule:
    """How the page names a directory, the same for every run whatever its lineage.json recorded (relative or
    absolute, a temp dir): a run in the report by its name, linked to its details (the name the tables, plots
    and graph use); any other path relative to the report's folder when it lies inside it (the page and its
    runs move together), else absolute."""

    def __init__(self, report_dir: Path, entries: list[Entry]):
        self.report_dir = Path(report_dir).resolve()
        self.runs = {str(e.path.resolve()): e for e in entries}

    def path(self, path) -> str:
        full = Path(str(path)).expanduser().resolve()
        return str(full.relative_to(self.report_dir)) if full.is_relative_to(self.report_dir) else str(full)

    def parent(self, parent: dict) -> str:
        where = parent.get("run") or parent.get("path")
        if not where:
            return f'<span class="mono">{escape(str(parent.get("preset") or parent.get("id") or parent.get("kind")))}</span>'
        for candidate in filter(None, (parent.get("run"), parent.get("path"))):
            if str(Path(str(candidate)).expanduser().resolve()) in self.runs:
                return _run_link(self.runs[str(Path(str(candidate)).expanduser().resolve())])
        return f'<span class="mono">{escape(self.path(where))}</span>'


def _parents(entry: Entry, shown: PathRule) -> str:
    parents = (entry.lineage or {}).get("parents") or []
    parts = []
    for p in parents:
        if not isinstance(p, dict):
            continue
        digest = lineage.digest(p)
        parts.append(f"{escape(str(p.get('role', 'parent')))}: {shown.parent(p)}"
                     + (f' <span class="muted mono">{escape(str(digest)[:12])}</span>' if digest else ""))
    return "<br>".join(parts) or "–"


def run_section(entry: Entry, shown: PathRule) -> str:
    lin = entry.lineage or {}
    env = entry.env or {}
    facts = [("directory", f'<span class="mono">{escape(shown.path(entry.path))}</span>'),
             ("stage", escape(entry.stage) + (f" · {escape(entry.method)}" if entry.method else "")),
             ("from", _parents(entry, shown))]
    data = [d for d in lin.get("data", []) if isinstance(d, dict)]
    if data:
        facts.append(("data", "<br>".join(
            f"{escape(str(d.get('role', 'train')))}: {escape(str(d.get('source')))} "
            f"<span class=\"muted mono\">{escape(str(d.get('content_hash', ''))[:12])}</span>"
            + (f" · {d['train_tokens']:,} tokens" if isinstance(d.get("train_tokens"), int) else "") for d in data)))
    if entry.tokenizer:
        facts.append(("tokenizer", f'<span class="mono">{escape(entry.tokenizer[:16])}</span> '
                                   f'({escape(str((lin.get("tokenizer") or {}).get("source", "")))})'))
    if env:
        device = ", ".join(env.get("gpus") or []) or env.get("cpu") or ""
        precision = (env.get("precision") or {})
        facts.append(("machine", escape(f"{device} ({env.get('cpu_count', '?')} CPUs), world size "
                                        f"{env.get('world_size', 1)}, python {env.get('python', '?')}, torch "
                                        f"{(env.get('packages') or {}).get('torch', '?')}")))
        if precision:
            facts.append(("precision", escape(f"{precision.get('used')} ({precision.get('why')})")))
        if env.get("git_commit"):
            facts.append(("git commit", f'<span class="mono">{escape(env["git_commit"][:12])}</span>'))
    size = (entry.op_record or {}).get("size") or {}
    if isinstance(size.get("before"), dict) and isinstance(size.get("after"), dict):
        before, after = size["before"], size["after"]
        facts.append(("size", escape(f"{_int(before.get('params'))} -> {_int(after.get('params'))} parameters"
                                     f" ({_int(after.get('nonzero_params'))} non-zero)")))
    parts = [f'<section class="run" id="{entry.anchor}"><h3>{_swatch(entry)}{escape(entry.label)}</h3>',
             '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"]
    if not entry.has_metrics and entry.op_record is None:
        parts.append('<p class="note">No metrics: metrics.jsonl is missing or holds no events.</p>')
    recorded = (entry.op_record or {}).get("eval") or {}
    scores = recorded.get("scores")  # a merge: every input and the merge; a prune: before and after
    if not isinstance(scores, dict):
        scores = {k: recorded[k] for k in ("before", "after") if isinstance(recorded.get(k), dict)}
    if scores:
        parts.append(f'<h3>held-out scores recorded by the {escape(entry.op_kind or "operation")}</h3>'
                     + _scores_table(scores))
    for sample in entry.samples:
        prompt, text = str(sample.get("prompt") or ""), str(sample["text"])
        if prompt and text.startswith(prompt):  # a generation that repeats its prompt: shown once, in bold
            text = text[len(prompt):]
        parts.append(f'<h3>sample at step {escape(str(sample.get("step", "?")))}</h3>'
                     f'<pre class="sample"><b>{escape(prompt)}</b>{escape(text)}</pre>')
    name = "config.yaml" if (entry.path / "config.yaml").is_file() else f"{entry.op_kind}.json recipe"
    if entry.config_text:
        parts.append(f"<details><summary>resolved config ({escape(name)})</summary><pre>{escape(entry.config_text)}</pre></details>")
    if entry.lineage is not None:
        parts.append(f"<details><summary>lineage.json</summary><pre>{escape(json.dumps(entry.lineage, indent=2))}</pre></details>")
    if entry.env is not None:
        parts.append(f"<details><summary>env.json</summary><pre>{escape(json.dumps(entry.env, indent=2))}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------- the page


def page(title: str, sections: list[tuple[str, str, str]], warnings: list[str], footer: str) -> str:
    """sections: (anchor, heading, html)."""
    nav = "".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in sections)
    warn_html = ""
    if warnings:
        warn_html = ('<div class="warnings"><b>Warnings</b><ul>'
                     + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul></div>")
    body = "".join(f'<h2 id="{a}">{escape(h)}</h2>{html}' for a, h, html in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<input class="xaxis" type="radio" name="xaxis" id="xaxis-step" checked aria-label="x axis: steps">
<input class="xaxis" type="radio" name="xaxis" id="xaxis-tokens" aria-label="x axis: tokens">
<header><div class="bar"><h1>{escape(title)}</h1><nav>{nav}</nav>
<span class="toggle" role="group" aria-label="x axis"><span>x axis</span><label for="xaxis-step">steps</label><label for="xaxis-tokens">tokens</label></span>
</div></header>
<main>
{warn_html}
{body}
<footer>{escape(footer)}</footer>
</main>
</body>
</html>
"""
