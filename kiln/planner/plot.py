"""IsoFLOP and fit plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import numpy as np

from kiln.planner.laws import LAWS, ParametricLaw


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_isoflops(plan: dict, law, path: str) -> None:
    """Left: loss vs N along IsoFLOP curves (C/100 .. 100 C) under a parametric law, with each
    curve's minimum and the planned point. Right: every law's N_opt(C) frontier and the plan."""
    plt = _pyplot()
    loss_law = law if isinstance(law, ParametricLaw) else LAWS["epoch"]
    c0, n0, d0 = plan["compute_flops"], plan["params"], plan["tokens"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for scale in (0.01, 0.1, 1, 10, 100):
        c = c0 * scale
        n_opt, _ = loss_law.optimum(c)
        n = np.logspace(np.log10(n_opt) - 1.5, np.log10(n_opt) + 1.5, 200)
        loss = [loss_law.loss(x, c / (6 * x)) for x in n]
        (line,) = left.plot(n, loss, label=f"C = {c:.1e}")
        left.plot([n_opt], [loss_law.loss(n_opt, c / (6 * n_opt))], "o", color=line.get_color(), ms=4)
    left.plot([n0], [loss_law.loss(n0, d0)], "*", color="black", ms=14, label="plan")
    left.set(xscale="log", xlabel="parameters N", ylabel=f"loss ({loss_law.name} law)",
             title="IsoFLOP curves (C = 6ND)")
    left.legend(fontsize=8)
    cs = np.logspace(17, 27, 60)
    laws = dict(LAWS)
    laws.setdefault(law.name, law)
    for name, each in laws.items():
        right.plot(cs, [each.optimum(c)[0] for c in cs], label=name, lw=2.5 if name == law.name else 1)
    right.plot([c0], [n0], "*", color="black", ms=14, label="plan")
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt",
              title="compute-optimal frontiers")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fit(points, law: ParametricLaw, path: str) -> None:
    """Final loss vs tokens per model size, with the fitted law's curves."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    sizes = sorted({p[0] for p in points})
    d_all = [p[1] for p in points]
    d = np.logspace(np.log10(min(d_all)) - 0.2, np.log10(max(d_all)) + 0.2, 100)
    for n in sizes:
        (line,) = ax.plot(d, [law.loss(n, x) for x in d], lw=1)
        pts = [(p[1], p[2]) for p in points if p[0] == n]
        ax.plot(*zip(*pts), "o", color=line.get_color(), label=f"N = {n:.3g}")
    ax.set(xscale="log", xlabel="tokens D", ylabel="final loss",
           title=f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_layouts(rows: list[dict], path: str, title: str) -> None:
    """One stacked bar per layout: the formula's per-GPU terms (kiln/planner/memory.py), in GiB, with
    the `--measure` peak of the same layout as a black marker when it was measured."""
    plt = _pyplot()
    terms = ["weights", "grads", "optimizer", "activations", "logits", "comm_buffers"]
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for term in terms:
        values = np.array([r["formula"].get(term, 0.0) for r in rows]) / 2 ** 30
        ax.bar(x, values, bottom=bottom, label=term, width=0.7)
        bottom += values
    totals = np.array([r["formula"]["total"] for r in rows]) / 2 ** 30
    ax.scatter(x, totals, marker="_", s=600, color="grey", label="formula peak (terms live at once)", zorder=3)
    measured = [(i, r["measured"]) for i, r in enumerate(rows) if r.get("measured")]
    if measured:
        ax.scatter([i for i, _ in measured], [m / 2 ** 30 for _, m in measured], marker="D", color="black",
                   label="--measure peak", zorder=4)
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
