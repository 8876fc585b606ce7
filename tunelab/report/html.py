"""The report page: one static HTML file, its plots inline SVG, its only interaction plain HTML/CSS.

The x-axis switch (steps / tokens) is a pair of radio buttons whose state CSS reads (`:checked ~`),
so the page needs no script at all; every plot is drawn twice and one of the two is hidden.
Each run's resolved config, lineage.json and env.json sit in <details> one click away.
"""

from __future__ import annotations

import json
from html import escape

from tunelab import lineage
from tunelab.report import svg
from tunelab.report.collect import Entry, EvalStage, summary

LOSS_UNIT = "loss (nats/token)"
BPB_UNIT = "bits per byte"
X_AXES = (("step", "step", "step"), ("tokens", "tokens", "tokens (trained by the run)"))

CSS = """
:root { --fg: #1b1f24; --muted: #5b6470; --line: #d8dde3; --bg-soft: #f5f7f9; --warn: #8a5a00;
        --good: #1a7f37; --bad: #c62828; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fff; }
main, header .bar { max-width: 1400px; margin: 0 auto; padding: 0 20px; }
header { position: sticky; top: 0; z-index: 2; background: rgba(255,255,255,.96); border-bottom: 1px solid var(--line); }
header .bar { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: center; padding-top: 8px; padding-bottom: 8px; }
header h1 { font-size: 18px; margin: 0; flex: 1 1 auto; }
header nav a { color: var(--muted); text-decoration: none; margin-right: 12px; font-size: 14px; }
header nav a:hover { color: var(--fg); text-decoration: underline; }
.toggle { display: inline-flex; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; font-size: 14px; }
.toggle span { padding: 3px 8px; color: var(--muted); }
.toggle label { padding: 3px 10px; cursor: pointer; border-left: 1px solid var(--line); }
input.xaxis { position: absolute; opacity: 0; pointer-events: none; }
#xaxis-step:checked ~ header label[for=xaxis-step],
#xaxis-tokens:checked ~ header label[for=xaxis-tokens] { background: #1f77b4; color: #fff; }
#xaxis-step:focus-visible ~ header label[for=xaxis-step],
#xaxis-tokens:focus-visible ~ header label[for=xaxis-tokens] { outline: 2px solid #1f77b4; }
#xaxis-step:checked ~ main .x-tokens, #xaxis-tokens:checked ~ main .x-step { display: none; }
h2 { font-size: 20px; margin: 32px 0 6px; padding-top: 6px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
p.note, .muted { color: var(--muted); font-size: 14px; margin: 4px 0 10px; }
.warnings { border: 1px solid #e7c36b; background: #fff8e5; color: var(--warn); border-radius: 6px;
            padding: 8px 14px; margin: 16px 0; font-size: 14px; }
.warnings ul { margin: 4px 0; padding-left: 20px; }
.table-wrap { overflow-x: auto; margin: 8px 0 6px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top;
         white-space: nowrap; }
thead th { background: var(--bg-soft); font-weight: 600; border-bottom: 2px solid var(--line); }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num .delta { display: inline-block; min-width: 5.2em; color: var(--muted); }
td.num .delta.up { color: var(--bad); }
td.num .delta.down { color: var(--good); }
td .star { display: inline-block; width: 1em; color: var(--bad); font-weight: 700; text-align: left; }
tr.summary td { background: var(--bg-soft); font-size: 13px; }
.badge { display: inline-block; font-size: 12px; padding: 0 6px; border-radius: 8px; background: #eee;
         color: var(--muted); margin-left: 6px; }
.swatch { display: inline-block; width: 18px; height: 0; border-top: 3px solid; vertical-align: middle; margin-right: 6px; }
.swatch.dashed { border-top-style: dashed; }
a.run { color: inherit; text-decoration: none; }
a.run:hover { text-decoration: underline; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 18px 22px; }
figure { margin: 0; min-width: 0; max-width: 780px; }
figcaption { font-weight: 600; font-size: 15px; margin-bottom: 2px; }
figcaption .muted { font-weight: 400; }
svg.plot { width: 100%; height: auto; display: block; }
svg.plot .frame { fill: none; stroke: #9aa3ad; }
svg.plot .grid { stroke: #e6e9ed; }
svg.plot .zero { stroke: #5b6470; stroke-dasharray: 4 3; }
svg.plot text { fill: #3b434c; font-family: inherit; }
svg.plot .tick { font-size: 12px; }
svg.plot .axis-label { font-size: 13px; fill: #1b1f24; }
ul.legend { list-style: none; margin: 4px 0 0; padding: 0; display: flex; flex-wrap: wrap; gap: 2px 16px; font-size: 13px; }
.graph-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; background: #fcfcfd; }
svg.lineage { display: block; font-family: inherit; }
svg.lineage .node rect { fill: #fff; stroke: #7d8791; stroke-width: 1.2; }
svg.lineage .node.node-run rect { stroke: #3b434c; stroke-width: 1.6; }
svg.lineage .node rect.stripe { stroke: none; }
svg.lineage .node.outside rect { stroke-dasharray: 5 3; fill: #f7f8fa; }
svg.lineage .node.node-data rect { fill: #fff7e0; stroke: #c9a227; }
svg.lineage .node.node-eval rect { fill: #eef4ff; stroke: #6a8fd8; }
svg.lineage .node-name { font-size: 13px; font-weight: 600; fill: #1b1f24; }
svg.lineage .node-line { font-size: 11.5px; fill: #5b6470; }
svg.lineage a:hover .node-name { text-decoration: underline; }
svg.lineage .edge { fill: none; stroke: #8a939c; stroke-width: 1.4; }
svg.lineage .edge-data { stroke: #c9a227; stroke-dasharray: 4 3; }
svg.lineage .edge-eval { stroke: #6a8fd8; stroke-dasharray: 2 3; }
svg.lineage .edge-dropped { stroke-dasharray: 3 4; opacity: .55; }
svg.lineage .edge-label { font-size: 11px; fill: #3b434c; paint-order: stroke; stroke: #fcfcfd; stroke-width: 4px;
                          stroke-linejoin: round; }
svg.lineage .edge-label .hash { fill: #7a838d; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 10.5px; }
.graph-key { font-size: 13px; color: var(--muted); margin: 6px 0; }
section.run { border: 1px solid var(--line); border-radius: 6px; padding: 4px 16px 10px; margin: 14px 0; }
section.run h3 { margin-top: 10px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; font-size: 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #1f5f99; font-size: 14px; }
pre { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 4px; padding: 8px 10px; overflow-x: auto;
      font-size: 12.5px; line-height: 1.4; max-height: 480px; }
pre.sample { white-space: pre-wrap; max-height: none; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.92em; }
footer { color: var(--muted); font-size: 13px; margin: 30px 0 20px; }
@media (max-width: 1000px) { th, td { padding: 4px 6px; } }
@media (max-width: 700px) { body { font-size: 14px; } main, header .bar { padding: 0 10px; }
  .plots { grid-template-columns: 1fr; } }
"""


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


def training_plots(entries: list[Entry], groups: dict[str, list[Entry]]) -> str:
    figures = []
    for fingerprint, members in groups.items():
        note = f"tokenizer {fingerprint[:8]}" if len(groups) > 1 else ""
        figures.append(_figure("Training loss", note, _train_series("loss"), LOSS_UNIT, members))
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
                 _num(s["train_loss"]), f'<span class="mono">{escape((s["tokenizer"] or "–")[:8])}</span>']
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' if h in numeric else f"<td>{c}</td>"
                                     for h, c in zip(head, cells)) + "</tr>")
    header = "".join(f'<th class="num">{h}</th>' if h in numeric else f"<th>{h}</th>" for h in head)
    return f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def final_table(table: dict, entries_by_path: dict[str, Entry]) -> str:
    """compare.forgetting_table as HTML: per domain, each run's last evaluation and its change since step 0."""
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
            cells.append(f'<td class="num">{cell["value"]:.4f} {delta_html}{star}</td>')
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
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
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


def eval_stages_table(stages: list[EvalStage]) -> str:
    columns = {s.name: s.results for s in stages}
    note = "".join(f'<p class="note">{escape(s.name)}: {escape(s.model or "model not recorded")}</p>' for s in stages)
    return _scores_table(columns) + note


# ---------------------------------------------------------------- per-run details


def _parents(entry: Entry) -> str:
    parents = (entry.lineage or {}).get("parents") or []
    parts = []
    for p in parents:
        if not isinstance(p, dict):
            continue
        what = p.get("run") or p.get("path") or p.get("preset") or p.get("id") or p.get("kind")
        digest = lineage.digest(p)
        parts.append(f"{escape(str(p.get('role', 'parent')))}: <span class=\"mono\">{escape(str(what))}</span>"
                     + (f' <span class="muted mono">{escape(str(digest)[:12])}</span>' if digest else ""))
    return "<br>".join(parts) or "–"


def run_section(entry: Entry) -> str:
    lin = entry.lineage or {}
    env = entry.env or {}
    facts = [("directory", f'<span class="mono">{escape(str(entry.path))}</span>'),
             ("stage", escape(entry.stage) + (f" · {escape(entry.method)}" if entry.method else "")),
             ("from", _parents(entry))]
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
