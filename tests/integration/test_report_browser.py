"""The report in a real browser: headless Chromium (Debian's `chromium`) renders a generated report.

Checked: no console message at all (the page has no script, so any would be an error: a blocked
fetch, a parse error), every plot and the lineage graph are in the rendered DOM with their points,
the steps/tokens switch changes what is shown, screenshots at 1366 and 800 px wide are written
(under the test's tmp dir), and, on fourteen runs at both widths, the layout measured in the browser
(element boxes from getBoundingClientRect, read back through --dump-dom): no table cut off (it fits
its box, or its box scrolls and the page itself never does; at 1366 px the final-evaluation table
fits), no axis title over a tick label, no two tick labels or lineage edge labels over each other.

Chromium comes from the system (.ci/run installs it where it can: `apt-get install chromium`);
without it the test skips and says why.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from report_runs import make_lifecycle, make_many
from tunelab.report import write_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
WIDTHS = (1366, 800)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does so where it runs as root)")
    return found


def _browse(chromium: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:  # a new empty profile each time
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    runs = make_lifecycle(root / "pipe")
    return write_report([runs["base"], runs["cont"], runs["lora"], runs["soup"]], root / "report.html",
                        warn=pytest.fail)


def test_report_renders_without_errors_and_every_plot_has_points(chromium, report):
    done = _browse(chromium, report, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], "\n".join(console)
    dom = done.stdout
    source = report.read_text()
    plots = re.findall(r'<svg class="plot".*?</svg>', dom, flags=re.S)
    assert len(plots) == source.count('<svg class="plot"') == 14
    for plot in plots:
        lines = re.findall(r'<polyline points="([^"]*)"', plot)
        assert lines, plot[:300]
        for points in lines:
            pairs = [p.split(",") for p in points.split()]
            assert pairs and all(len(p) == 2 and all(re.fullmatch(r"-?[\d.]+", v) for v in p) for p in pairs)
        assert re.search(r'class="axis-label"[^>]*>[^<]+<', plot)  # both axes are labelled
    graph = re.search(r'<svg class="lineage".*?</svg>', dom, flags=re.S)
    assert graph, "the lineage graph is missing"
    assert len(re.findall(r'<g class="node', graph.group(0))) >= 7
    assert len(re.findall(r'<path class="edge', graph.group(0))) >= 10


def test_screenshots_and_the_x_axis_switch(chromium, report, tmp_path):
    shots = {}
    for width in WIDTHS:
        shot = tmp_path / f"report-{width}.png"
        done = _browse(chromium, report, f"--screenshot={shot}", f"--window-size={width},900")
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        assert _png_size(shot)[0] == width
        shots[width] = shot
    # The same page with "tokens" selected: the plots change (the page has no script; CSS reads the radio).
    tokens = report.with_name("report-tokens.html")
    html = report.read_text()
    html = html.replace('id="xaxis-step" checked', 'id="xaxis-step"').replace('id="xaxis-tokens"', 'id="xaxis-tokens" checked')
    tokens.write_text(html)
    views = []
    for page in (report, tokens):
        shot = tmp_path / f"{page.stem}-plots.png"
        done = _browse(chromium, page, f"--screenshot={shot}", "--window-size=1366,2200")
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        views.append(shot.read_bytes())
    assert views[0] != views[1]
    print(f"screenshots: {', '.join(str(s) for s in shots.values())}")


# Injected into a copy of the page (the report itself has no script): opens every <details>, measures the
# boxes that matter and leaves them, as JSON, in a <pre> that --dump-dom prints.
MEASURE = """<script>
document.querySelectorAll('details').forEach(d => { d.open = true; });
const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const shown = el => el.getClientRects().length > 0;
const found = {width: window.innerWidth, page: document.documentElement.scrollWidth, tables: [], plots: []};
for (const wrap of document.querySelectorAll('.table-wrap')) {
  const table = wrap.querySelector('table');
  const heading = wrap.previousElementSibling;
  found.tables.push({final: !!heading && heading.id === 'final', wrap: box(wrap), table: box(table),
                     scroll: wrap.scrollWidth, client: wrap.clientWidth, overflow: getComputedStyle(wrap).overflowX});
}
for (const svg of document.querySelectorAll('svg.plot')) {
  if (!shown(svg)) continue;  // the hidden one of the steps/tokens pair
  const texts = [...svg.querySelectorAll('text.tick')].map(t => ({box: box(t), x: t.getAttribute('text-anchor') === 'middle'}));
  found.plots.push({name: svg.getAttribute('aria-label'), ticks: texts,
                    titles: [...svg.querySelectorAll('text.axis-label')].map(box)});
}
const graph = document.querySelector('svg.lineage');
found.edge_labels = [...graph.querySelectorAll('text.edge-label')].map(t => ({box: box(t), text: t.textContent}));
found.nodes = [...graph.querySelectorAll('g.node > rect:not(.stripe)')].map(box);
const pre = document.createElement('pre');
pre.id = 'measured';
pre.textContent = JSON.stringify(found);
document.body.appendChild(pre);
</script>"""


def _overlap(a, b, slack: float = 0.5) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > slack and min(a[3], b[3]) - max(a[1], b[1]) > slack


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    make_many(root / "runs")
    page = write_report([str(root / "runs" / "*")], root / "runs" / "report.html", warn=lambda message: None)
    measured = root / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    return measured


@pytest.mark.parametrize("width", WIDTHS)
def test_fourteen_runs_lay_out_without_cut_off_or_overlap(chromium, many, width):
    done = _browse(chromium, many, f"--window-size={width},1000", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    got = re.search(r'<pre id="measured">(.*?)</pre>', done.stdout, flags=re.S)
    assert got, done.stdout[-2000:]
    found = json.loads(html.unescape(got.group(1)))
    assert found["width"] == width
    problems = []  # every defect at once, not only the first
    if found["page"] > width:
        problems.append(f"the page scrolls sideways ({found['page']} px): something is wider than the window")
    assert len(found["tables"]) >= 4
    for table in found["tables"]:
        if table["wrap"][2] > width + 0.5:
            problems.append(f"a table's box reaches past the window: {table}")
        if table["table"][2] > table["wrap"][2] + 0.5 and not (table["overflow"] in ("auto", "scroll")
                                                               and table["scroll"] > table["client"]):
            problems.append(f"a table is cut off by its box: {table}")
    final = [t for t in found["tables"] if t["final"]]
    assert len(final) == 1
    if width >= 1366 and final[0]["table"][2] > final[0]["wrap"][2] + 0.5:  # twelve runs with evaluations
        problems.append(f"the final-evaluation table is wider than a {width} px window: {final[0]}")
    assert len(found["plots"]) >= 8
    for plot in found["plots"]:
        ticks = [t["box"] for t in plot["ticks"]]
        assert len(plot["titles"]) == 2
        for title in plot["titles"]:
            hits = [t for t in ticks if _overlap(title, t)]
            if hits:
                problems.append(f"{plot['name']}: an axis title overlaps tick labels {hits}")
        if any(_overlap(a, b) for i, a in enumerate(ticks) for b in ticks[i + 1:]):
            problems.append(f"{plot['name']}: tick labels overlap")
    labels = found["edge_labels"]
    assert len(labels) >= 14
    for i, a in enumerate(labels):
        problems += [f"edge labels overlap: {a['text']!r} and {b['text']!r}" for b in labels[i + 1:]
                     if _overlap(a["box"], b["box"])]
        problems += [f"edge label {a['text']!r} lies under a node box" for node in found["nodes"]
                     if _overlap(a["box"], node)]
    assert problems == [], "\n".join(problems)
