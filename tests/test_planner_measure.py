"""`kiln estimate --measure` (one fake-tensor training step under MemTracker) as the oracle for the
memory formula. Small but realistic widths keep it to seconds per layout."""
import pytest

from kiln.config import load_config
from kiln.model import count_params
from kiln.planner.estimate import layout_of
from kiln.planner.memory import memory_breakdown

BASE = ["data.synthetic=markov", "model.d_model=512", "model.n_layers=2", "model.n_heads=8", "model.vocab_size=32000",
        "data.seq_len=512"]


@pytest.mark.parametrize("gpus,extra", [
    (2, ["parallel.dp_shard=2", "train.micro_batch=2", "parallel.activation_checkpoint=none"]),
    (4, ["parallel.dp_shard=4", "train.micro_batch=1", "parallel.activation_checkpoint=full"]),
])
def test_formula_matches_the_measured_step(gpus, extra):
    from kiln.planner.measure import measure

    cfg = load_config([], BASE + extra)
    measured = measure(cfg, gpus)
    lay = layout_of(cfg, gpus)
    # independent oracle for the measurement itself: FSDP2 keeps fp32 parameters (4 B) and Adam's
    # m, v (8 B) for its shard of every parameter (TP shards matrices, norms are replicated)
    n = count_params(cfg.model)
    tp = lay.tp
    norms = cfg.model.d_model * (2 * cfg.model.n_layers + 1)
    shard = ((n - norms) / tp + norms) / lay.shard
    assert measured["weights"] == pytest.approx(4 * shard, rel=0.02)
    assert measured["optimizer"] == pytest.approx(8 * shard, rel=0.02)
    formula = memory_breakdown(cfg.model, cfg.data.seq_len, lay)
    assert formula["weights"] + formula["optimizer"] == pytest.approx(measured["weights"] + measured["optimizer"],
                                                                      rel=0.02)
    # within 10% on these layouts, and on the safe side: a formula that reads low would say "fits" where
    # the step does not (measured: +3% for FSDP2 without recompute, +10% with full recompute)
    assert 0.97 * measured["total"] <= formula["total"] <= 1.12 * measured["total"], (formula, measured)


SUBSET = 6  # FSDP-only layouts from bench/planner_memory.py's seeded 100 (it prints the whole distribution)


def test_formula_against_measure_on_seeded_fsdp_layouts():
    """The issue's goal where the formula meets it today (bench/planner_memory.py: 96% of FSDP-only
    layouts within 10%; TP, pipelines and DeepSpeed not yet): seeded random FSDP2 layouts (dp_shard,
    recompute, seq, micro-batch, accumulation) within 10% of `--measure`."""
    from kiln.planner.layouts import random_layouts
    from kiln.planner.measure import measure

    picked = [x for x in random_layouts(60, seed=0) if " tp1 pp1 " in f" {x[0]} " and not x[0].startswith("ds-")]
    ratios = []
    for label, cfg, gpus in picked[:SUBSET]:
        measured = measure(cfg, gpus)["total"]
        formula = memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, gpus))["total"]
        ratios.append((round(formula / measured, 3), label))
    assert len(ratios) == SUBSET
    # 5 of these 6 today (the sixth, tiny activations at s256 b1, peaks at the optimizer step: 0.82)
    assert sum(0.9 <= r <= 1.1 for r, _ in ratios) >= SUBSET - 1, ratios


def test_measure_runs_every_layout_kind_and_refuses_interleaved_stages():
    from kiln.errors import KilnError
    from kiln.planner.measure import measure

    pp = measure(load_config([], BASE + ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch=2"]), 2)
    assert pp["stage"] == 1  # the last stage (output layer and logits) is the fuller one
    with pytest.raises(KilnError, match="interleaved"):
        measure(load_config([], BASE + ["model.n_layers=4", "parallel.pp=2", "parallel.dp_shard=1",
                                        "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                                        "train.micro_batch=2"]), 2)
