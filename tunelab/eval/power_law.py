"""Power-law fits with confidence intervals (numpy only): L(C) = E + A*C^-b and the Chinchilla form
L(N, D) = E + A/N^alpha + B/D^beta, fitted by least squares on log L (Levenberg-Marquardt). The forms,
the fitting and the intervals are described in eval/scaling.py, which fits them over runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tunelab.errors import ConfigError

# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom; beyond, the
# Cornish-Fisher expansion around the normal quantile is within 1e-3 of it.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    if dof < 1:
        return float("inf")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


# ---------------------------------------------------------------- least squares


def levenberg_marquardt(residuals, jacobian, theta0, max_iter: int = 500, tol: float = 1e-12):
    """Minimise sum(residuals(theta)^2); returns (theta, sum of squares)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a trial step may overflow: rejected
        return _lm(residuals, jacobian, np.asarray(theta0, dtype=np.float64), max_iter, tol)


def _lm(residuals, jacobian, theta, max_iter, tol):
    r = residuals(theta)
    cost = float(r @ r)
    damping = 1e-3
    for _ in range(max_iter):
        J = jacobian(theta)
        JtJ, Jtr = J.T @ J, J.T @ r
        scale = np.diag(JtJ).copy()
        scale[scale == 0] = 1.0
        try:
            step = np.linalg.solve(JtJ + damping * np.diag(scale), -Jtr)
        except np.linalg.LinAlgError:
            damping *= 10
            continue
        candidate = theta + step
        r_new = residuals(candidate)
        new_cost = float(r_new @ r_new)
        if np.isfinite(new_cost) and new_cost < cost:
            done = cost - new_cost <= tol * max(cost, 1e-30) and np.max(np.abs(step)) < 1e-10 + 1e-8 * np.max(np.abs(theta))
            theta, r, cost = candidate, r_new, new_cost
            damping = max(damping / 10, 1e-12)
            if done:
                break
        else:
            damping *= 10
            if damping > 1e12:
                break
    return theta, cost


@dataclass
class Fit:
    form: str
    names: list[str]          # parameter names, in the order of values/ci
    values: dict[str, float]  # in original units (E, A, B, exponents)
    ci: dict[str, list[float] | None]
    rmse_log: float           # root mean square residual of log L
    points: int
    dof: int
    notes: list[str] = field(default_factory=list)
    scale: dict[str, float] = field(default_factory=dict)  # geometric means used for conditioning

    def to_dict(self) -> dict:
        return {"form": self.form, "values": self.values, "ci95": self.ci, "rmse_log": self.rmse_log,
                "points": self.points, "dof": self.dof, "notes": self.notes}


def _covariance_ci(J: np.ndarray, cost: float, n: int, p: int) -> tuple[np.ndarray | None, int]:
    """Half-widths of 95% intervals of the fitted (internal) parameters; None where J^T J is singular."""
    dof = n - p
    if dof < 1:
        return None, dof
    try:
        cov = np.linalg.inv(J.T @ J) * (cost / dof)
    except np.linalg.LinAlgError:
        return None, dof
    if not np.all(np.isfinite(cov)) or np.any(np.diag(cov) < 0):
        return None, dof
    return t975(dof) * np.sqrt(np.diag(cov)), dof


def fit_compute(C, L, floor: bool = True) -> Fit:
    """L(C) = E + A * C^-b (floor) or A * C^-b, least squares on log L."""
    C, L = np.asarray(C, dtype=np.float64), np.asarray(L, dtype=np.float64)
    p = 3 if floor else 2
    _check_points(L, p, "lc", "--no-floor drops E (2 parameters)" if floor else "")
    c0 = float(np.exp(np.mean(np.log(C))))
    x = np.log(C / c0)
    y = np.log(L)

    # theta = [log A', b] (+ [log E]); prediction A' exp(-b x) (+ E), A' = A c0^-b.
    def predict(theta):
        power = np.exp(theta[0] - theta[1] * x)
        return power + (np.exp(theta[2]) if floor else 0.0), power

    def residuals(theta):
        return np.log(predict(theta)[0]) - y

    def jacobian(theta):
        total, power = predict(theta)
        cols = [power / total, -x * power / total]
        if floor:
            cols.append(np.exp(theta[2]) / total)
        return np.stack(cols, axis=1)

    best = None
    for share in ((0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.995) if floor else (0.0,)):
        floor0 = share * L.min()
        slope, intercept = np.polyfit(x, np.log(L - floor0), 1)  # log(L - E) = log A' - b x
        start = [intercept, -slope] + ([math.log(max(floor0, 1e-3 * L.min()))] if floor else [])
        theta, cost = levenberg_marquardt(residuals, jacobian, start)
        if best is None or cost < best[1]:
            best = (theta, cost)
    theta, cost = best
    half, dof = _covariance_ci(jacobian(theta), cost, len(L), p)
    b = float(theta[1])
    values = {"A": float(math.exp(theta[0] + b * math.log(c0))), "b": b}
    ci = {"b": [b - float(half[1]), b + float(half[1])] if half is not None else None}
    if floor:
        values["E"] = float(math.exp(theta[2]))
        ci["E"] = [math.exp(theta[2] - half[2]), math.exp(theta[2] + half[2])] if half is not None else None
    notes = [] if half is not None else ["the fit's covariance is singular: no confidence intervals"]
    return Fit("lc", list(values), values, ci, float(math.sqrt(cost / len(L))), len(L), dof, notes, {"C": c0})


def fit_chinchilla(N, D, L) -> Fit:
    """L(N, D) = E + A / N^alpha + B / D^beta, least squares on log L."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    _check_points(L, 5, "ln", "")
    for name, values in (("N (parameters)", N), ("D (tokens)", D)):
        if len(np.unique(values)) < 2:
            raise ConfigError(f"--form ln: every run has the same {name}; the L(N, D) fit needs runs that differ "
                              "in both model size and tokens (use --form lc for one model size)")
    if abs(np.corrcoef(np.log(N), np.log(D))[0, 1]) > 0.999:
        raise ConfigError("--form ln: the runs' N and D grow together (the same tokens per parameter), so the fit "
                          "cannot tell the size term from the data term; add runs that vary them apart, or use --form lc")
    n0, d0 = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(D))))
    x, z, y = np.log(N / n0), np.log(D / d0), np.log(L)

    # theta = [log E, log A', alpha, log B', beta]; A' = A n0^-alpha, B' = B d0^-beta.
    def terms(theta):
        return np.exp(theta[0]), np.exp(theta[1] - theta[2] * x), np.exp(theta[3] - theta[4] * z)

    def residuals(theta):
        return np.log(sum(terms(theta))) - y

    def jacobian(theta):
        e, a, b = terms(theta)
        total = e + a + b
        return np.stack([e / total, a / total, -x * a / total, b / total, -z * b / total], axis=1)

    best = None
    for alpha in (0.1, 0.3, 0.6, 1.0):
        for beta in (0.1, 0.3, 0.6, 1.0):
            for share in (0.1, 0.5, 0.8):
                floor0 = share * L.min()
                # With E and the exponents fixed, L - E is linear in A' and B': solve for them.
                basis = np.stack([np.exp(-alpha * x), np.exp(-beta * z)], axis=1)
                coef, *_ = np.linalg.lstsq(basis, L - floor0, rcond=None)
                coef = np.maximum(coef, 1e-3 * L.min())
                start = [math.log(floor0), math.log(coef[0]), alpha, math.log(coef[1]), beta]
                theta, cost = levenberg_marquardt(residuals, jacobian, start)
                if best is None or cost < best[1]:
                    best = (theta, cost)
    theta, cost = best
    half, dof = _covariance_ci(jacobian(theta), cost, len(L), 5)
    alpha, beta = float(theta[2]), float(theta[4])
    values = {"E": float(math.exp(theta[0])), "A": float(math.exp(theta[1] + alpha * math.log(n0))), "alpha": alpha,
              "B": float(math.exp(theta[3] + beta * math.log(d0))), "beta": beta,
              "n_opt_exponent": beta / (alpha + beta), "d_opt_exponent": alpha / (alpha + beta)}
    ci = {"E": [math.exp(theta[0] - half[0]), math.exp(theta[0] + half[0])] if half is not None else None,
          "alpha": [alpha - float(half[2]), alpha + float(half[2])] if half is not None else None,
          "beta": [beta - float(half[4]), beta + float(half[4])] if half is not None else None}
    notes = [] if half is not None else ["the fit's covariance is singular: no confidence intervals"]
    return Fit("ln", list(values), values, ci, float(math.sqrt(cost / len(L))), len(L), dof, notes,
               {"N": n0, "D": d0})


def _check_points(L: np.ndarray, p: int, form: str, hint: str) -> None:
    if len(L) <= p:
        raise ConfigError(f"--form {form}: {len(L)} run{'s' * (len(L) != 1)} for {p} parameters; a fit with "
                          f"confidence intervals needs at least {p + 1}" + (f" ({hint})" if hint else ""))
    if not np.all(np.isfinite(L)) or np.any(L <= 0):
        raise ConfigError(f"--form {form}: losses must be finite and positive")


def predict(fit: Fit, C=None, N=None, D=None):
    v = fit.values
    if fit.form == "lc":
        return v.get("E", 0.0) + v["A"] * np.asarray(C, dtype=np.float64) ** -v["b"]
    return v["E"] + v["A"] * np.asarray(N, dtype=np.float64) ** -v["alpha"] + v["B"] * np.asarray(D, dtype=np.float64) ** -v["beta"]


def optimal_allocation(fit: Fit, compute: float) -> tuple[float, float]:
    """N, D minimising L(N, D) under 6 N D = compute (closed form, Hoffmann et al. eq. 4)."""
    v = fit.values
    a, b = v["alpha"], v["beta"]
    g = (a * v["A"] / (b * v["B"])) ** (1 / (a + b))
    n = g * (compute / 6) ** (b / (a + b))
    return float(n), float(compute / 6 / n)
