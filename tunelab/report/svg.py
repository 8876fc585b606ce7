"""Line plots as inline SVG, written by hand: no plotting library, no script, no network.

A plot scales with its container (viewBox, width 100%), so its text is drawn at a size that
stays readable from ~420 px wide (one column on a narrow window) to ~700 px (two columns at
1280 px). Every series is a <polyline> with a <title> (the browser's own tooltip names the run);
points that matter one by one (evaluations) get markers with their value in a <title>.
"""

from __future__ import annotations

import math
from html import escape

# Ten colours that stay apart on white (and for most colour-blind readers, with the dashes below
# for an eleventh run on).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3")

WIDTH, HEIGHT = 640, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 46
TITLE_X = 16  # the y-axis title's baseline (rotated: its glyphs reach ~12 px left of it, ~4 px right)
MAX_POINTS = 1500  # a long run's curve is thinned to this many points: the picture does not change


def style_of(index: int) -> tuple[str, str]:
    """(colour, dash pattern) of the index-th run: the same in every plot and in the lineage graph."""
    return PALETTE[index % len(PALETTE)], DASHES[(index // len(PALETTE)) % len(DASHES)]


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (m * power) <= target * 1.4)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value = first + len(ticks) * step
    return ticks


def fmt(value: float, span: float | None = None) -> str:
    """A short, readable number: 20k, 1.5M, 0.002, 3.25, 1e-4."""
    if value is None or not math.isfinite(value):
        return "-"
    a = abs(value)
    if a == 0:
        return "0"
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e4, "k")):
        if a >= limit:
            scaled = value / (limit if suffix != "k" else 1e3)
            return f"{scaled:.3g}{suffix}"
    if a < 1e-3 and (span is None or span < 1e-4):
        mantissa, exponent = f"{value:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if span is not None and span > 0:  # ticks: as many decimals as the spacing needs
        decimals = max(0, min(6, -math.floor(math.log10(span)) + 1))
        return f"{value:.{decimals}f}".rstrip("0").rstrip(".") if decimals else f"{value:.0f}"
    return f"{value:.4g}"


def text_width(text: str, size: float = 12) -> float:
    """A generous width of a tick label in px (digits ~0.56 em in the usual sans fonts; '.' and ',' narrow)."""
    return sum(0.3 if ch in ".,:" else 0.62 for ch in text) * size


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _range(values: list[float], from_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if from_zero and lo >= 0:  # steps and tokens: the axis starts at 0
        lo = 0.0
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return (lo if from_zero and lo == 0 else lo - pad), hi + pad


def line_plot(series: list[dict], x_label: str, y_label: str, zero_line: bool = False,
              aria: str = "") -> str:
    """An SVG line plot.

    series: [{"name", "color", "dash", "points": [(x, y), ...], "markers": bool, "unit": str}]
    (points with a None or non-finite coordinate are left out). Returns "" when nothing is left to draw.
    """
    cleaned = []
    for s in series:
        pts = [(float(x), float(y)) for x, y in s["points"]
               if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
        if pts:
            cleaned.append({**s, "points": sorted(pts, key=lambda p: p[0])})
    if not cleaned:
        return ""
    xs = [x for s in cleaned for x, _ in s["points"]]
    ys = [y for s in cleaned for _, y in s["points"]] + ([0.0] if zero_line else [])
    x0, x1 = _range(xs, from_zero=True)
    y0, y1 = _range(ys)
    xt, yt = nice_ticks(x0, x1, 6), nice_ticks(y0, y1, 5)
    x_span = xt[1] - xt[0] if len(xt) > 1 else None
    y_span = yt[1] - yt[0] if len(yt) > 1 else None
    y_texts = [fmt(t, y_span) for t in yt]
    # The y-axis title sits left of the widest tick label (0.00025 is twice as wide as 0.5): the plot starts there.
    left = max(LEFT, round(TITLE_X + 4 + 6 + max(text_width(t) for t in y_texts) + 6))
    pw, ph = WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" '
           f'role="img" aria-label="{escape(aria or y_label)}">']
    out.append(f'<rect class="frame" x="{left}" y="{TOP}" width="{pw}" height="{ph}"/>')
    for t in xt:
        x = sx(t)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{TOP + ph + 15}" text-anchor="middle">{fmt(t, x_span)}</text>')
    for t, text in zip(yt, y_texts):
        y = sy(t)
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{text}</text>')
    if zero_line and y0 < 0 < y1:
        out.append(f'<line class="zero" x1="{left}" y1="{sy(0):.1f}" x2="{left + pw}" y2="{sy(0):.1f}"/>')
    out.append(f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text class="axis-label" transform="translate({TITLE_X} {TOP + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for s in cleaned:
        pts = _thin(s["points"])
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        out.append(f'<g class="series"><title>{escape(s["name"])}</title>'
                   f'<polyline points="{coords}" fill="none" stroke="{s["color"]}" stroke-width="2"{dash}/>')
        if s.get("markers") or len(pts) == 1:
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s["color"]}">'
                           f'<title>{escape(s["name"])}: {fmt(y)} at {fmt(x)}</title></circle>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
