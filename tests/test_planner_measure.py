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


SUBSET = 6  # layouts from bench/planner_memory.py's seeded 100 (it prints the whole distribution)


def _ratios(keep, count: int) -> list[tuple[float, str]]:
    from kiln.planner.layouts import random_layouts
    from kiln.planner.measure import measure

    picked = [x for x in random_layouts(60, seed=0) if keep(f" {x[0]} ")][:count]
    assert len(picked) == count
    return [(round(memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, gpus))["total"]
                   / measure(cfg, gpus)["total"], 3), label) for label, cfg, gpus in picked]


def test_formula_against_measure_on_seeded_fsdp_layouts():
    """Seeded random FSDP2 layouts (dp_shard, recompute, seq, micro-batch, accumulation) within 10%
    of `--measure`, and not below it by more than 1%: short sequences peak at the end of backward
    (the embedding's gradient), which the formula models (before: 0.82 on s256 b1)."""
    ratios = _ratios(lambda x: " tp1 pp1 " in x and " ds-" not in x, SUBSET)
    assert all(0.99 <= r <= 1.1 for r, _ in ratios), ratios


def test_formula_against_measure_on_seeded_tp_and_pipeline_layouts():
    """TP x FSDP2 and pipelines: 9 of these 10 within 10% (a 1F1B last stage reads 11% high), and
    none below 0.9 of the measurement, so at the default 0.9 headroom none would "fit" wrongly."""
    ratios = _ratios(lambda x: " tp1 pp1 " not in x and " ds-" not in x, 10)
    assert sum(0.9 <= r <= 1.1 for r, _ in ratios) >= 9, ratios
    assert min(r for r, _ in ratios) >= 0.9, ratios


def test_measure_runs_every_layout_kind_and_refuses_interleaved_stages():
    from kiln.errors import KilnError
    from kiln.planner.measure import measure

    pp = measure(load_config([], BASE + ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch=2"]), 2)
    assert pp["stage"] == 1  # the last stage (output layer and logits) is the fuller one
    with pytest.raises(KilnError, match="interleaved"):
        measure(load_config([], BASE + ["model.n_layers=4", "parallel.pp=2", "parallel.dp_shard=1",
                                        "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                                        "train.micro_batch=2"]), 2)


def test_a_deepspeed_zero3_measurement_leaves_the_process_as_it_found_it():
    """ZeRO-3 swaps torch.nn.functional.linear process-wide; measuring after it in the same process
    (the bench, the test suite) must give what a fresh `kiln estimate --measure` gives."""
    import torch

    from kiln.planner.measure import measure

    dense = load_config([], BASE + ["parallel.dp_shard=1", "parallel.mixed_precision=bf16", "train.micro_batch=2"])
    alone = measure(dense, 1)["total"]
    linear = torch.nn.functional.linear
    measure(load_config([], BASE + ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp_shard=1"]), 1)
    assert torch.nn.functional.linear is linear
    assert measure(dense, 1)["total"] == alone
