"""Fit L(N, D) = E + A/N^alpha + B/D^beta to your own runs' final losses.

The loss is Hoffmann et al. 2022's (App. D.2): the Huber loss (delta 1e-3) between
LSE(a - alpha log N, b - beta log D, e) and log L, A = e^a, B = e^b, E = e^e, started from a
grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}. The
grid's 4,500 starts are scored in one vectorised pass; L-BFGS runs from the best `starts` of
them on the Huber loss scaled to units of delta^2 (unscaled, clean data give a loss of ~1e-8 and
L-BFGS stops at its default tolerance far from the optimum), and the best few solutions are
polished by robust least squares (scipy's `least_squares`, Huber loss, exact Jacobian).
The fit then checks itself: convergence, the rank of the Jacobian, and whether other starts fit
equally well with different constants; any failure is reported as "not identified".
Intervals come from a bootstrap over points, each refit warm-started from the full-data optimum.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from kiln.errors import KilnError

HUBER_DELTA = 1e-3
GRID = np.array(list(itertools.product(
    np.arange(0, 26, 5.0),  # a
    np.arange(0, 26, 5.0),  # b
    np.arange(-1, 1.01, 0.5),  # e
    np.arange(0, 2.01, 0.5),  # alpha
    np.arange(0, 2.01, 0.5),  # beta
)))
NAMES = ("E", "A", "B", "alpha", "beta")
POLISH = 3  # L-BFGS solutions refined by least squares and compared for identifiability


def _lse(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log-sum-exp over the last axis and its softmax weights (plain numpy: scipy's versions
    cost milliseconds per call, which dominates thousands of L-BFGS evaluations)."""
    top = terms.max(axis=-1, keepdims=True)
    ex = np.exp(terms - top)
    total = ex.sum(axis=-1, keepdims=True)
    return (np.log(total) + top)[..., 0], ex / total


def _residuals(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """theta (..., 5) -> residuals (..., points)."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e), axis=-1)
    return _lse(terms)[0] - log_l


def _huber(r: np.ndarray) -> np.ndarray:
    absr = np.abs(r)
    return np.where(absr <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA))


def _objective(theta: np.ndarray, log_n, log_d, log_l) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=-1)
    lse, w = _lse(terms)
    r = lse - log_l
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    grad = np.array([
        np.sum(dr * w[:, 0]), np.sum(dr * w[:, 1]), np.sum(dr * w[:, 2]),
        np.sum(dr * w[:, 0] * -log_n), np.sum(dr * w[:, 1] * -log_d),
    ])
    return float(np.sum(_huber(r))), grad


def _jacobian(theta: np.ndarray, log_n, log_d) -> np.ndarray:
    """d residual / d (a, b, e, alpha, beta), points x 5."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=-1)
    w = _lse(terms)[1]
    return np.stack([w[:, 0], w[:, 1], w[:, 2], -w[:, 0] * log_n, -w[:, 1] * log_d], axis=1)


def _solve(x0, log_n, log_d, log_l):
    """One robust least-squares fit: the Huber loss (delta 1e-3) on log-space residuals, solved as
    nonlinear least squares with the exact Jacobian. (L-BFGS-B on the summed Huber loss stops at
    its default gradient tolerance long before the optimum: on clean data the loss is ~1e-8.)"""
    from scipy.optimize import least_squares

    return least_squares(_residuals, x0, jac=lambda t, *a: _jacobian(t, a[0], a[1]), args=(log_n, log_d, log_l),
                         loss="huber", f_scale=HUBER_DELTA, method="trf", x_scale="jac",
                         xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=200)


def _scaled_objective(theta, log_n, log_d, log_l):
    """Mean Huber loss in units of delta^2, so L-BFGS's gradient tolerance means something when
    the residuals are tiny (clean data give a raw loss of ~1e-8, below scipy's default gtol)."""
    f, g = _objective(theta, log_n, log_d, log_l)
    k = 1.0 / (HUBER_DELTA ** 2 * len(log_n))
    return f * k, g * k


def _fit_logs(log_n, log_d, log_l, starts: int, extra: list | None = None, all_results: bool = False):
    """L-BFGS from the `starts` best grid points (and `extra`), then least-squares polishing of
    the best few; returns the best polished solution (and all of them)."""
    scores = _huber(_residuals(GRID, log_n, log_d, log_l)).sum(axis=1)
    inits = list(GRID[np.argsort(scores)[:starts]]) + (extra or [])
    runs = [minimize(_scaled_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}) for x0 in inits]
    runs = sorted((r for r in runs if np.all(np.isfinite(r.x))), key=lambda r: r.fun)
    results = [_solve(r.x, log_n, log_d, log_l) for r in runs[:POLISH]]
    best = min(results, key=lambda r: r.cost)
    return (best, results) if all_results else best.x


def _diagnose(best, results, log_n, log_d) -> list[str]:
    """Why the constants may not be trusted: no convergence, a flat direction (the Jacobian is
    rank-deficient), or other starts reaching the same loss with different constants."""
    problems = []
    if best.status <= 0:
        problems.append(f"the best start did not converge ({best.message})")
    j = _jacobian(best.x, log_n, log_d)
    sv = np.linalg.svd(j / np.maximum(np.abs(j).max(axis=0), 1e-300), compute_uv=False)
    if sv[-1] < 1e-6 * sv[0]:
        problems.append(f"the runs leave a direction of (E, A, B, alpha, beta) unconstrained "
                        f"(condition number {sv[0] / max(sv[-1], 1e-300):.2g})")
    mine = _constants(best.x)
    tol = max(best.cost * 1e-3, 1e-14)
    for other in results:
        if other.cost <= best.cost + tol:
            theirs = _constants(other.x)
            worst = max(abs(theirs[k] / mine[k] - 1) for k in NAMES)
            if worst > 0.01:
                problems.append(f"other starts fit the runs equally well with constants up to {worst:.0%} "
                                f"different")
                break
    return problems


def _constants(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = theta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}


def _one_blas_thread():
    """L-BFGS-B makes thousands of tiny LAPACK calls; a threaded BLAS makes each one wake its
    thread pool, 5-10x slower on a busy machine. threadpoolctl is optional."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_law(params, tokens, losses, bootstrap: int = 200, starts: int = 8, seed: int = 0) -> dict:
    """Constants, bootstrap 95% intervals and the implied N_opt exponent a = beta/(alpha+beta)."""
    with _one_blas_thread():
        return _fit_law(params, tokens, losses, bootstrap, starts, seed)


def _fit_law(params, tokens, losses, bootstrap: int, starts: int, seed: int) -> dict:
    n, d, l = (np.asarray(x, dtype=float) for x in (params, tokens, losses))
    if len(n) < 5:
        raise KilnError(f"fitting 5 constants needs at least 5 runs; got {len(n)}")
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise KilnError("the runs need at least 2 distinct model sizes and 2 distinct token counts")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(l <= 0) or not np.all(np.isfinite(l)):
        raise KilnError("params, tokens and loss must be positive and finite in every run")
    logs = np.log(n), np.log(d), np.log(l)
    best, results = _fit_logs(*logs, starts=starts, all_results=True)
    theta = best.x
    result = _constants(theta)
    result["rms_log_residual"] = float(np.sqrt(np.mean(best.fun ** 2)))
    result["problems"] = _diagnose(best, results, logs[0], logs[1])
    result["identified"] = not result["problems"]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(set(idx)) < 5:
            continue
        samples.append(_solve(theta, *(x[idx] for x in logs)).x)  # warm start: the full-data optimum
    if samples:
        consts = [_constants(s) for s in samples]
        result["intervals"] = {k: [float(np.percentile([c[k] for c in consts], q)) for q in (2.5, 97.5)]
                               for k in NAMES}
        exps = [c["beta"] / (c["alpha"] + c["beta"]) for c in consts]
        result["intervals"]["a"] = [float(np.percentile(exps, 2.5)), float(np.percentile(exps, 97.5))]
    result["a"] = result["beta"] / (result["alpha"] + result["beta"])
    result["n_points"] = len(n)
    result["bootstrap"] = len(samples)
    return result


def _final_record(path: Path) -> tuple[float, float]:
    """(tokens, loss) of a metrics.jsonl: the last eval loss if any, else the last train loss."""
    last_train = last_eval = None
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise KilnError(f"{path}: not JSON lines") from None
            if rec.get("eval_loss") is not None:
                last_eval = (rec.get("tokens"), rec["eval_loss"])
            elif rec.get("loss") is not None:
                last_train = (rec.get("tokens"), rec["loss"])
    found = last_eval or last_train
    if not found or found[0] is None:
        raise KilnError(f"{path}: no record with tokens and loss")
    return float(found[0]), float(found[1])


def _run_params(config_path: Path) -> int:
    from kiln.config import from_yaml_text
    from kiln.model import count_params

    if not config_path.is_file():
        raise KilnError(f"{config_path}: missing; a run directory needs its config.yaml to count parameters")
    return int(count_params(from_yaml_text(config_path.read_text()).model))


def _rows_from_table(path: Path) -> list[tuple[float, float, float]]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            text = path.read_text()
            rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        return [(float(r["params"]), float(r["tokens"]), float(r["loss"])) for r in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise KilnError(f"{path}: expected rows with params, tokens, loss ({exc})") from None


def load_points(paths: list[str]) -> list[tuple[float, float, float]]:
    """(params, tokens, loss) from run directories, metrics.jsonl files, or CSV/JSON tables."""
    points = []
    for p in map(Path, paths):
        if p.is_dir():
            points.append((_run_params(p / "config.yaml"), *_final_record(p / "metrics.jsonl")))
        elif p.name == "metrics.jsonl":
            points.append((_run_params(p.parent / "config.yaml"), *_final_record(p)))
        elif p.is_file():
            points.extend(_rows_from_table(p))
        else:
            raise KilnError(f"{p}: no such run directory or file")
    return points


def save_law(result: dict, points, path: str) -> None:
    law = {"law": "parametric", "name": Path(path).stem, "source": f"kiln plan fit over {len(points)} runs",
           **{k: result[k] for k in NAMES}, "a": result["a"], "intervals": result.get("intervals"),
           "identified": result["identified"], "problems": result["problems"],
           "points": [{"params": n, "tokens": d, "loss": l} for n, d, l in points]}
    Path(path).write_text(json.dumps(law, indent=2) + "\n")
