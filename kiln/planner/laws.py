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
  sardana       Chinchilla's Approach 3 as Sardana et al. 2024 (arXiv 2401.00448) use it for the
                inference-aware optimum (E 1.69, A 406.4, B 410.7, alpha 0.336, beta 0.283).
  muennighoff   Muennighoff et al. 2023 (arXiv 2305.16264): repeated data (`DataConstrainedLaw`).
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
        "sardana": ParametricLaw("sardana", E=1.69, A=406.4, B=410.7, alpha=0.336, beta=0.283,
                                 source="Hoffmann et al. 2022 Approach 3 as used by Sardana et al. 2024"),
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
    n0, d0 = law.optimum(c)
    return inference_optimum_at_loss(law, law.loss(n0, d0), inference_tokens, n_max=n0)


def inference_optimum_at_loss(law: ParametricLaw, target: float, inference_tokens: float,
                              n_max: float | None = None) -> tuple[float, float]:
    """Sardana et al. 2024, sec. 2: minimise 6 N D_train + 2 N D_inf subject to L(N, D_train) =
    target. With D_inf > 0 the optimum is never larger than the compute-optimal model at that
    loss, which bounds the search from above."""
    from scipy.optimize import minimize_scalar

    if not target > law.E:
        raise KilnError(f"target loss {target:g} is at or below the law's irreducible loss E = {law.E:g}")

    def d_for(n: float) -> float:
        gap = target - law.E - law.A / n ** law.alpha
        return (law.B / gap) ** (1 / law.beta) if gap > 0 else math.inf

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        d = d_for(n)
        return math.log(6 * n * d + 2 * n * inference_tokens) if math.isfinite(d) else 1e9

    # The loss constraint needs N > N_min where A/N^alpha = target - E; search above it, up to
    # the compute-optimal N at this loss (where d(6ND)/dN = 0; extra inference only pushes N down).
    n_min = (law.A / (target - law.E)) ** (1 / law.alpha)
    if n_max is None:
        n_max = _compute_optimal_n_at_loss(law, target, n_min)
    res = minimize_scalar(total, bounds=(math.log(n_min) + 1e-6, math.log(n_max) + 1e-9), method="bounded",
                          options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, d_for(n)


def _compute_optimal_n_at_loss(law: ParametricLaw, target: float, n_min: float) -> float:
    """The N whose compute-optimal run reaches `target` (bisection on the closed-form optimum)."""
    lo, hi = 1.0, 1e40
    for _ in range(300):
        mid = math.sqrt(lo * hi)
        n, d = law.optimum(mid)
        lo, hi = (mid, hi) if law.loss(n, d) > target else (lo, mid)
    return max(law.optimum(hi)[0], n_min * 1.000001)


@dataclass(frozen=True)
class DataConstrainedLaw:
    """Muennighoff et al. 2023 (arXiv 2305.16264), eq. 5 with the constants of their released fit
    (github.com/huggingface/datablations, "Parametric Fit"): repeated tokens and parameters in
    excess of what U unique tokens can use decay in value with R_D* and R_N*.

    L(N, D, U) = E + A / (U_N + U_N R_N* (1 - exp(-R_N / R_N*)))^alpha
                   + B / (U + U R_D* (1 - exp(-R_D / R_D*)))^beta
    with R_D = D/U - 1 repetitions, U_N = min(N, N_opt(U)) and R_N = N/U_N - 1."""

    name: str = "muennighoff"
    E: float = math.exp(0.6254804)
    A: float = math.exp(6.255414)
    B: float = math.exp(7.3049974)
    alpha: float = 0.3526596
    beta: float = 0.3526596
    rd_star: float = 15.387756
    rn_star: float = 5.309743
    source: str = "Muennighoff et al. 2023, data-constrained scaling (released fit)"

    @property
    def base(self) -> ParametricLaw:
        return ParametricLaw(self.name, self.E, self.A, self.B, self.alpha, self.beta, self.source)

    def params_for_tokens(self, d: float) -> float:
        """The N whose compute-optimal token count is d (Chinchilla's closed form inverted)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return (d * g) ** (self.beta / self.alpha) * g

    def loss(self, n: float, d: float, unique: float) -> float:
        u = min(unique, d)
        r_d = max(d / u - 1, 0.0)
        u_n = min(n, self.params_for_tokens(u))
        r_n = max(n / u_n - 1, 0.0)
        n_eff = u_n + u_n * self.rn_star * (1 - math.exp(-r_n / self.rn_star))
        d_eff = u + u * self.rd_star * (1 - math.exp(-r_d / self.rd_star))
        return self.E + self.A / n_eff ** self.alpha + self.B / d_eff ** self.beta

    def optimum(self, c: float, unique: float) -> tuple[float, float]:
        """(N, D) with 6 N D = c minimising L(N, D, U), searched along the IsoFLOP curve."""
        from scipy.optimize import minimize_scalar

        n0, _ = self.base.optimum(c)
        f = lambda x: self.loss(math.exp(x), c / (6 * math.exp(x)), unique)  # noqa: E731
        # the loss is unimodal along the curve but has kinks where D = U and N = N_opt(U):
        # a coarse grid picks the bracket, the bounded search refines it
        grid = np.linspace(math.log(n0) - 6, math.log(n0) + 3, 181)
        k = int(np.argmin([f(x) for x in grid]))
        res = minimize_scalar(f, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]),
                              method="bounded", options={"xatol": 1e-10})
        n = math.exp(res.x)
        return n, c / (6 * n)


MUENNIGHOFF = DataConstrainedLaw()
