"""The report in a real browser: headless Chromium (Debian's `chromium`) renders a generated report.

Checked: no console message at all (the page has no script, so any would be an error: a blocked
fetch, a parse error), every plot and the lineage graph are in the rendered DOM with their points,
the steps/tokens switch changes what is shown, and screenshots at 1280 and 900 px wide are written
(under the test's tmp dir: report-1280.png, report-900.png).

Chromium is installed by the test when missing, where that is possible (root with apt-get, as in CI);
elsewhere the test skips and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from report_runs import make_lifecycle
from tunelab.report import write_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed, and installing it needs root and apt-get (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=900, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=900,
                       env=env)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"chromium could not be installed with apt-get: {err} {detail.decode(errors='replace')[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install chromium succeeded but no chromium binary is on PATH")
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
    for width in (1280, 900):
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
        done = _browse(chromium, page, f"--screenshot={shot}", "--window-size=1280,2200")
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        views.append(shot.read_bytes())
    assert views[0] != views[1]
    print(f"screenshots: {', '.join(str(s) for s in shots.values())}")
