"""Scaling-law fits over a set of runs, with confidence intervals and an SVG plot (numpy only).

Two forms:
- `lc`: L(C) = E + A * C^-b, with C = 6 N D training FLOPs (Kaplan et al., 2020); `floor=False` drops E
  (a straight line in log-log, L = A * C^-b).
- `ln`: L(N, D) = E + A / N^alpha + B / D^beta, the Chinchilla form (Hoffmann et al., 2022, approach 3),
  with the compute-optimal allocation it implies: N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta)).

Fitting: least squares on log L (relative errors, as Chinchilla fits; they used a Huber loss, plain
least squares keeps the covariance meaningful), with positive E, A, B through their logs and N, D, C
divided by their geometric means (for conditioning). Levenberg-Marquardt from a grid of starting points
(each completed by a linear solve), the best fit kept. Confidence intervals: the covariance of the fit,
s^2 (J^T J)^-1 at the optimum with s^2 = residual sum of squares / (points - parameters), times
Student's t quantile for that many degrees of freedom. They assume the form is right and the residuals
independent: with few runs they are wide, as they should be.

A run's point: N = parameters of its final model (from the safetensors headers, tied weights once;
`non-embedding` leaves out embedding and LM-head matrices, as Kaplan et al. count), D = tokens the run
trained on (its last train event; a continued run counts only its own), L = its final evaluation of one
domain (loss or bits per byte).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tunelab.errors import ConfigError, RunDirError
from tunelab.eval.power_law import Fit, fit_chinchilla, fit_compute, optimal_allocation, predict

FORMS = ("lc", "ln")
PARAMS = ("total", "non-embedding")


# ---------------------------------------------------------------- points from run directories


def model_parameters(model_dir: Path, which: str = "total") -> int | None:
    """Parameters stored in a model directory's safetensors files (read from their headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    files = [f for f in files if f.name != "adapter_model.safetensors"]
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if which == "non-embedding" and any(k in name for k in ("embed", "lm_head", "wte", "wpe")):
                continue
            total += math.prod(info["shape"])
    return total


def _model_dir(run: Path) -> Path | None:
    if (run / "final").is_dir() and list((run / "final").glob("*.safetensors")):
        return run / "final"
    checkpoints = sorted(run.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]) if
                         p.name.split("-")[1].isdigit() else -1)
    return checkpoints[-1] if checkpoints else None


def run_point(run: str | Path, domain: str, metric: str = "loss", params: str = "total") -> dict:
    from tunelab.eval.relative import run_evals
    from tunelab.runs import read_metrics

    path = Path(run)
    evals = run_evals(path)
    if domain not in evals:
        raise RunDirError(f"RUN: {run} has no evaluation of domain {domain!r} (it has {', '.join(evals)}); "
                          "pick a domain every run evaluates with --domain")
    value = evals[domain]["final"].get(metric)
    if value is None:
        raise RunDirError(f"RUN: {run}: the final evaluation of {domain} has no {metric}")
    trains = [e for e in read_metrics(path / "metrics.jsonl") if e.get("event") == "train"]
    tokens = trains[-1].get("tokens") if trains else None
    if not tokens:
        raise RunDirError(f"RUN: {run} has no train events with token counts; give runs written by tunelab "
                          "pretrain/finetune")
    where = _model_dir(path)
    if where is None or (where / "adapter_config.json").is_file():
        raise RunDirError(f"RUN: {run}: no full model in final/ or checkpoints/ (an adapter run's N is not its "
                          "model's size); scaling fits need full-weight runs")
    n = model_parameters(where, params)
    if not n:
        raise RunDirError(f"RUN: {run}: {where} has no safetensors weights to count parameters from")
    return {"name": path.name or str(path), "path": str(path), "N": n, "D": int(tokens), "C": 6.0 * n * tokens,
            "L": float(value), "step": evals[domain]["final"].get("step")}


def common_domain(runs: list[Path]) -> str:
    """The one domain every run trained on (role target); else a ConfigError listing the candidates."""
    from tunelab.eval.relative import run_evals

    all_evals = [run_evals(r) for r in runs]
    shared = set.intersection(*[set(e) for e in all_evals])
    targets = [d for d in sorted(shared) if all(e[d]["role"] in ("target", "?") for e in all_evals)]
    if len(targets) == 1:
        return targets[0]
    if len(shared) == 1:
        return next(iter(shared))
    raise ConfigError("--domain: the runs share " + (f"the domains {', '.join(sorted(shared))}; name the one to fit"
                                                      if shared else "no evaluated domain") + " (--domain NAME)")


def scaling_fit(runs: list[str | Path], form: str = "lc", domain: str | None = None, metric: str = "loss",
                params: str = "total", floor: bool = True) -> dict:
    """Points from run directories, the fit, and its predictions at 10x and 100x the largest compute."""
    if form not in FORMS:
        raise ConfigError(f"--form: {form!r} is not one of {', '.join(FORMS)}")
    if params not in PARAMS:
        raise ConfigError(f"--params: {params!r} is not one of {', '.join(PARAMS)}")
    if metric not in ("loss", "bpb"):
        raise ConfigError(f"--metric: {metric!r} is not one of loss, bpb")
    paths = [Path(r) for r in dict.fromkeys(str(r) for r in runs)]
    domain = domain or common_domain(paths)
    points = [run_point(p, domain, metric, params) for p in paths]
    L = [p["L"] for p in points]
    if form == "lc":
        fit = fit_compute([p["C"] for p in points], L, floor=floor)
    else:
        fit = fit_chinchilla([p["N"] for p in points], [p["D"] for p in points], L)
    c_max = max(p["C"] for p in points)
    extrapolation = []
    notes = list(fit.notes)
    exponents = [fit.values[k] for k in ("b", "alpha", "beta") if k in fit.values]
    if min(exponents) <= 0:
        notes.append("a fitted exponent is not positive (loss does not fall with scale in this fit): "
                     "no extrapolation")
    else:
        for factor in (10, 100):
            c = c_max * factor
            if fit.form == "lc":
                extrapolation.append({"C": c, "L": float(predict(fit, C=c))})
            else:  # the compute-optimal split of c (Chinchilla's N_opt, D_opt for this fit)
                n, d = optimal_allocation(fit, c)
                extrapolation.append({"C": c, "N": n, "D": d, "L": float(predict(fit, N=n, D=d))})
    if any(p["D"] < 20 * p["N"] for p in points):
        notes.append("some runs saw fewer than 20 tokens per parameter (Chinchilla's compute-optimal ratio)")
    return {"form": form, "floor": floor if form == "lc" else True, "domain": domain, "metric": metric,
            "params": params, "points": points, "fit": fit.to_dict(), "extrapolation": extrapolation, "notes": notes}


# ---------------------------------------------------------------- plot

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _fmt(value: float) -> str:
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.0e}".replace("e+0", "e").replace("e+", "e")


def svg_plot(result: dict, width: int = 640, height: int = 400) -> str:
    """Log-log plot: the runs' points and the fitted curve, solid over the data and dashed beyond it.

    lc: L against C, extended to 100x the largest C. ln: L against D, one curve per model size N,
    extended to 10x the largest D. A small self-contained SVG (no scripts, no external fonts)."""
    points, values = result["points"], result["fit"]["values"]
    fit = Fit(result["form"], list(values), values, {}, 0.0, 0, 0)
    left, right, top, bottom = 64, 28, 28, 48
    key = "C" if result["form"] == "lc" else "D"
    xs = [p[key] for p in points]
    x_lo, x_hi = min(xs) / 1.5, max(xs) * (100 if key == "C" else 10)  # a margin before the first point
    curves = []  # (colour, label, [(x, y)], data end)
    if result["form"] == "lc":
        grid = np.geomspace(x_lo, x_hi, 80)
        curves.append((_COLOURS[0], "fit", list(zip(grid, predict(fit, C=grid))), max(xs)))
        colour_of = {None: _COLOURS[0]}
    else:
        sizes = sorted({p["N"] for p in points})
        colour_of = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(sizes)}
        for n in sizes:
            grid = np.geomspace(x_lo, x_hi, 80)
            data_end = max(p["D"] for p in points if p["N"] == n)
            curves.append((colour_of[n], f"N={_fmt(n)}", list(zip(grid, predict(fit, N=n, D=grid))), data_end))
    ys = [p["L"] for p in points] + [y for _, _, line, _ in curves for _, y in line]
    y_lo, y_hi = min(ys) * 0.95, max(ys) * 1.05
    lx = (math.log10(x_lo), math.log10(x_hi))
    ly = (math.log10(y_lo), math.log10(y_hi))

    def px(x):
        return left + (math.log10(x) - lx[0]) / (lx[1] - lx[0] or 1) * (width - left - right)

    def py(y):
        return height - bottom - (math.log10(y) - ly[0]) / (ly[1] - ly[0] or 1) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for exp in range(math.ceil(lx[0]), math.floor(lx[1]) + 1):
        x = px(10 ** exp)
        out.append(f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">1e{exp}</text>')
    for y in np.geomspace(y_lo, y_hi, 5):
        out.append(f'<line x1="{left - 4}" y1="{py(y):.1f}" x2="{left}" y2="{py(y):.1f}" stroke="black"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    x_name = "compute C = 6ND (FLOPs)" if key == "C" else "tokens D"
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{x_name}</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{result["metric"]} ({result["domain"]})</text>')
    exps = ", ".join(f"{k}={values[k]:.3f}" for k in ("b", "alpha", "beta") if k in values)
    out.append(f'<text x="{left}" y="16">{"L(C)" if key == "C" else "L(N, D)"} fit: {exps}</text>')
    for colour, label, line, data_end in curves:
        inside = [(x, y) for x, y in line if x <= data_end * 1.0001]
        beyond = [(x, y) for x, y in line if x >= (inside[-1][0] if inside else 0)]
        for part, dash in ((inside, ""), (beyond, ' stroke-dasharray="5,4"')):
            if len(part) > 1:
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in part)
                out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
    for p in points:
        colour = colour_of.get(p["N"], _COLOURS[0]) if key == "D" else _COLOURS[0]
        out.append(f'<circle cx="{px(p[key]):.1f}" cy="{py(p["L"]):.1f}" r="3.5" fill="{colour}">'
                   f'<title>{p["name"]}: N={p["N"]:,} D={p["D"]:,} L={p["L"]:.4f}</title></circle>')
    if key == "D":
        for i, (colour, label, _, _) in enumerate(curves):
            out.append(f'<text x="{width - right - 4}" y="{top + 12 + 14 * i}" text-anchor="end" fill="{colour}">'
                       f'{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_fit(result: dict, console=None) -> None:
    """Print the points, the fitted law with 95% intervals, and the extrapolation."""
    from rich.table import Table

    from tunelab.console import table_console

    console = console or table_console()
    table = Table(title=f"scaling: final {result['metric']} on {result['domain']} ({result['params']} parameters)")
    for col in ("run", "N", "D", "C = 6ND", result["metric"]):
        table.add_column(col, justify="left" if col == "run" else "right")
    for p in result["points"]:
        table.add_row(p["name"], f"{p['N']:,}", f"{p['D']:,}", f"{p['C']:.3g}", f"{p['L']:.4f}")
    console.print(table)
    fit, v = result["fit"], result["fit"]["values"]

    def with_ci(name: str) -> str:
        ci = fit["ci95"].get(name)
        return f"{v[name]:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")

    if result["form"] == "lc":
        law = f"L(C) = {with_ci('E') + ' + ' if 'E' in v else ''}{v['A']:.4g} * C^-{with_ci('b')}"
    else:
        law = (f"L(N, D) = {with_ci('E')} + {v['A']:.4g} / N^{with_ci('alpha')} + {v['B']:.4g} / D^{with_ci('beta')}"
               f"\ncompute-optimal: N_opt ~ C^{v['n_opt_exponent']:.3f}, D_opt ~ C^{v['d_opt_exponent']:.3f}")
    console.print(law, markup=False, highlight=False)
    console.print(f"[95% intervals from the fit's covariance, Student t with {fit['dof']} degrees of freedom; "
                  f"rms residual of log L {fit['rmse_log']:.4f}]", markup=False, highlight=False, style="dim")
    for e in result["extrapolation"]:
        where = f"N={e['N']:.3g}, D={e['D']:.3g}, " if "N" in e else ""
        console.print(f"extrapolated: C={e['C']:.3g} ({where.rstrip(', ') or 'compute only'}): "
                      f"{result['metric']} {e['L']:.4f}", markup=False, highlight=False)
    for note in result["notes"]:
        console.print(note, style="dim", markup=False, highlight=False)
