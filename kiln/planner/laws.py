"""Compute-optimal scaling laws: budget C (FLOPs, C = 6 N D) -> parameters N, tokens D.

Sources (constants cited where used; facts in shared/reference/planner.md):
  chinchilla-1  Hoffmann et al. 2022 (arXiv 2203.15556) Approach 1: a power law
                N_opt = k C^a least-squares fitted here to the paper's Table 3 rows.
  chinchilla-2  Approach 2 exponent a = 0.49 (Table 2); the constant k is the
                least-squares value with a fixed, fitted to Table A3's (FLOPs, params) rows.
  chinchilla-3  Approach 3 parametric L = E + A/N^alpha + B/D^beta with the unrounded
                constants from the paper's TeX, closed-form optimum.
  epoch         Besiroglu et al. 2024 (arXiv 2404.10102) refit of the same form (default).
  kaplan        Kaplan et al. 2020 (arXiv 2001.08361), for comparing exponents only.
Approaches 1 and 2 have no loss formula; their predicted loss is None.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import KilnError

DEFAULT_LAW = "epoch"
PF_DAY = 8.64e19  # FLOPs in one petaflop/s-day (Kaplan's compute unit)

# Chinchilla Table 3 (Approach 1): params, FLOPs, tokens.
TABLE3 = ((400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
          (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
          (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12))
# Chinchilla Table A3 (Approach 2): params, FLOPs, tokens.
TABLE_A3 = ((400e6, 1.84e19, 7.7e9), (1e9, 1.20e20, 20.0e9), (10e9, 1.32e22, 219.5e9),
            (67e9, 6.88e23, 1.7e12), (175e9, 4.54e24, 4.3e12), (280e9, 1.18e25, 7.1e12),
            (520e9, 4.19e25, 13.4e12), (1e12, 1.59e26, 26.5e12), (10e12, 1.75e28, 292.0e12))


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, optimum under C = 6 N D in closed form."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimum(self, c: float) -> tuple[float, float]:
        # Hoffmann et al. eq. 4: N_opt = G (C/6)^a, D_opt = (C/6)^b / G.
        a = self.beta / (self.alpha + self.beta)
        b = self.alpha / (self.alpha + self.beta)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (c / 6) ** a, (c / 6) ** b / g

    @property
    def exponents(self) -> tuple[float, float]:
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def to_dict(self) -> dict:
        return {"law": "parametric", "name": self.name, "E": self.E, "A": self.A, "B": self.B,
                "alpha": self.alpha, "beta": self.beta, "source": self.source}


@dataclass(frozen=True)
class PowerLaw:
    """N_opt = k C^a (C in `unit` FLOPs), D_opt = C / (6 N_opt); no loss formula."""

    name: str
    k: float
    a: float
    unit: float = 1.0
    source: str = ""

    def loss(self, n: float, d: float) -> float | None:
        return None

    def optimum(self, c: float) -> tuple[float, float]:
        n = self.k * (c / self.unit) ** self.a
        return n, c / (6 * n)

    @property
    def exponents(self) -> tuple[float, float]:
        return self.a, 1 - self.a


@dataclass(frozen=True)
class KaplanLaw(PowerLaw):
    """Kaplan's N_opt = 1.3e9 C_min^0.73 (C in PF-days; N excludes embeddings) and his joint
    L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (nats, WebText2 tokens: not
    comparable with the Chinchilla-form losses)."""

    def loss(self, n: float, d: float) -> float:
        alpha_n, alpha_d, n_c, d_c = 0.076, 0.095, 8.8e13, 5.4e13  # Kaplan et al. 2020, eq. 1.5
        return ((n_c / n) ** (alpha_n / alpha_d) + d_c / d) ** alpha_d


def _fit_power(rows, slope: float | None = None) -> tuple[float, float]:
    """Least squares of log N on log C; with `slope` fixed, only the constant is fitted."""
    log_n = np.log([r[0] for r in rows])
    log_c = np.log([r[1] for r in rows])
    if slope is None:
        slope, intercept = np.polyfit(log_c, log_n, 1)
    else:
        intercept = float(np.mean(log_n - slope * log_c))
    return math.exp(intercept), float(slope)


def _builtin() -> dict:
    k1, a1 = _fit_power(TABLE3)
    k2, a2 = _fit_power(TABLE_A3, slope=0.49)
    return {
        "chinchilla-1": PowerLaw("chinchilla-1", k1, a1, source="Hoffmann et al. 2022, Approach 1 frontier fitted to Table 3"),
        "chinchilla-2": PowerLaw("chinchilla-2", k2, a2, source="Hoffmann et al. 2022, Approach 2: a=0.49 (Table 2), k fitted to Table A3"),
        "chinchilla-3": ParametricLaw(
            "chinchilla-3", E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186),
            alpha=0.33917084, beta=0.2849083, source="Hoffmann et al. 2022, Approach 3, unrounded constants"),
        "epoch": ParametricLaw("epoch", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                               source="Besiroglu et al. 2024, Chinchilla replication"),
        "kaplan": KaplanLaw("kaplan", 1.3e9, 0.73, unit=PF_DAY, source="Kaplan et al. 2020 (non-embedding N)"),
    }


LAWS = _builtin()


def get_law(name: str):
    """A built-in law by name, or a law file written by `kiln plan fit`."""
    if name in LAWS:
        return LAWS[name]
    path = Path(name)
    if path.is_file():
        return load_law_file(path)
    raise KilnError(f"unknown law {name!r}; known: {', '.join(LAWS)}, or a law file from `kiln plan fit`")


def load_law_file(path: Path) -> ParametricLaw:
    try:
        data = json.loads(Path(path).read_text())
        return ParametricLaw(data.get("name", Path(path).stem), float(data["E"]), float(data["A"]),
                             float(data["B"]), float(data["alpha"]), float(data["beta"]),
                             source=data.get("source", f"fitted, {path}"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KilnError(f"{path}: not a law file from `kiln plan fit` ({exc})") from None


def inference_optimum(law: ParametricLaw, c: float, inference_tokens: float) -> tuple[float, float]:
    """Sardana et al. 2024 (arXiv 2401.00448): the (N, D_train) that reaches the loss of the
    compute-optimal model at budget C while minimising 6 N D_train + 2 N D_inf."""
    from scipy.optimize import minimize_scalar

    n0, d0 = law.optimum(c)
    target = law.loss(n0, d0)

    def d_for(n: float) -> float:
        gap = target - law.E - law.A / n ** law.alpha
        return (law.B / gap) ** (1 / law.beta) if gap > 0 else math.inf

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        d = d_for(n)
        return math.log(6 * n * d + 2 * n * inference_tokens) if math.isfinite(d) else 1e9

    # The loss constraint needs N > N_min where A/N^alpha = target - E; search above it.
    n_min = (law.A / (target - law.E)) ** (1 / law.alpha)
    res = minimize_scalar(total, bounds=(math.log(n_min) + 1e-6, math.log(n0) + 1e-9), method="bounded",
                          options={"xatol": 1e-8})
    n = math.exp(res.x)
    return n, d_for(n)
