"""Fit L(N, D) = E + A/N^alpha + B/D^beta to your own runs' final losses.

The method of Hoffmann et al. 2022 (App. D.2): minimise the Huber loss (delta 1e-3) between
LSE(a - alpha log N, b - beta log D, e) and log L with L-BFGS, A = e^a, B = e^b, E = e^e,
started from a grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
a, b in {0, 5, ..., 25}. The grid's 4,500 starts are scored in one vectorised pass and
L-BFGS runs from the best `starts` of them (the paper runs every start; pruning keeps a fit
to a second). Intervals come from a bootstrap over points, each refit warm-started from the
full-data optimum and the resample's best grid starts.
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


def _fit_logs(log_n, log_d, log_l, starts: int, extra: list | None = None) -> np.ndarray:
    scores = _huber(_residuals(GRID, log_n, log_d, log_l)).sum(axis=1)
    inits = list(GRID[np.argsort(scores)[:starts]]) + (extra or [])
    best, best_val = None, math.inf
    for x0 in inits:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B")
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    return best


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


def fit_law(params, tokens, losses, bootstrap: int = 200, starts: int = 32, seed: int = 0) -> dict:
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
    theta = _fit_logs(*logs, starts=starts)
    result = _constants(theta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(set(idx)) < 5:
            continue
        samples.append(_fit_logs(*(x[idx] for x in logs), starts=3, extra=[theta]))
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
           "points": [{"params": n, "tokens": d, "loss": l} for n, d, l in points]}
    Path(path).write_text(json.dumps(law, indent=2) + "\n")
