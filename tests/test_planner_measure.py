"""`kiln estimate --measure` (one fake-tensor training step under MemTracker) as the oracle for the
memory formula. Small but realistic widths keep it to seconds per layout."""
import sys

import pytest
import torch

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
    hook = sys.excepthook
    measured = measure(cfg, gpus)
    assert sys.excepthook is hook  # torch's "[rankN]:" wrapper leaves with the fake world (it stacked)
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


HELD_OUT = 27  # seed 2's first layouts (every kind is among them); the constants were fitted on seeds 0 and 1


def test_formula_against_measure_on_held_out_layouts():
    """The issue's goal on held-out seeded layouts (FSDP2, TP, PP, MoE, DeepSpeed ZeRO-1/2/3;
    recompute, sequence, micro-batch, accumulation): the formula within 10% of `--measure` for at least 90% of
    them, and never "fits" where the measured step does not: at any usable memory below the
    measured peak, `fits` (the formula with its margin) says no. bench/planner_memory.py prints
    the whole distribution over 100 layouts per seed."""
    from kiln.planner.layouts import random_layouts
    from kiln.planner.measure import measure
    from kiln.planner.memory import fits

    rows = []
    for label, cfg, gpus in random_layouts(HELD_OUT, seed=2):
        formula = memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, gpus))["total"]
        rows.append((formula, measure(cfg, gpus)["total"], label, cfg.model))
    kinds = {label.split()[0] if label.startswith("ds-") else label.split()[1] for *_, label, _ in rows}
    kinds |= {"moe"} if any(" moe" in label for *_, label, _ in rows) else set()
    assert {"pp1", "pp2", "ds-zero1", "ds-zero2", "ds-zero3", "moe"} <= kinds, kinds  # every kind is in the sample
    ratios = [(round(f / m, 3), label) for f, m, label, _ in rows]
    assert sum(abs(r - 1) <= 0.1 for r, _ in ratios) >= 0.9 * len(rows), ratios
    wrong = [(r, label) for (f, m, label, model), (r, _) in zip(rows, ratios) if fits(f, 0.999 * m, model)]
    assert not wrong, wrong


@pytest.mark.parametrize("row", [
    # a pipeline under FSDP2 keeps its stage gathered and its gradients unsharded after the first
    # backward (torch's schedules reduce after the last micro-batch): the formula read 0.78 here
    "d4096 L8 V128k tp1 pp2 dp4 selective s1024 b2 acc1",
    "d1536 L16 V64k tp1 pp2 dp4 none s2048 b2 acc1 moe8x2",  # the same with a MoE model: 0.62
    # MoE under FSDP2 with full recompute: the backward of a layer that gathers every expert, 0.84
    "d2048 L12 V32k tp1 pp1 dp8 full s2048 b1 acc1 moe8x2",
    # GPipe's last stage keeps every micro-batch's fp32 logits for its loss's backward: 0.79
    "d1536 L8 V64k tp1 pp2 dp2 none s2048 b4 acc1 pp_microbatches=4 pp_schedule=gpipe",
])
def test_formula_at_real_widths(row):
    """Billions of parameters, where per-layer and per-parameter terms outweigh the logits: the peaks
    the small seeded layouts do not reach (layouts.WIDE; these measure 9-14 GiB, in 10-20 s each)."""
    from kiln.planner.layouts import wide_layouts
    from kiln.planner.measure import measure
    from kiln.planner.memory import fits

    (label, cfg, gpus), = [w for w in wide_layouts() if w[0] == row]
    measured = measure(cfg, gpus)["total"]
    formula = memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, gpus))["total"]
    assert 0.93 <= formula / measured <= 1.10, (label, formula / 2 ** 30, measured / 2 ** 30)
    assert not fits(formula, 0.999 * measured, cfg.model)


def test_selective_recompute_of_moe_experts_depends_on_grouped_mm(monkeypatch):
    """As one torch._grouped_mm (sm90+, and --measure) the routed experts save nothing under
    selective recompute; as kiln's per-expert loop (A100, V100) they save their matrix products:
    `kiln estimate` counts those where its --gpu runs the loop."""
    import kiln.model.moe
    from kiln.planner.estimate import estimate
    from kiln.planner.measure import measure

    over = ["data.synthetic=markov", "model.d_model=1024", "model.n_heads=8", "model.n_kv_heads=4", "model.n_layers=4",
            "data.seq_len=4096", "model.max_seq_len=4096", "parallel.dp_shard=4", "train.micro_batch=2",
            "parallel.activation_checkpoint=selective", "train.global_batch_tokens=32768", "model.moe.n_experts=8",
            "model.moe.top_k=2"]
    cfg = load_config([], over)
    lay = layout_of(cfg, 4)
    grouped = memory_breakdown(cfg.model, 4096, lay)["total"]
    lay.grouped_experts = False
    loop = memory_breakdown(cfg.model, 4096, lay)["total"]
    monkeypatch.setattr(kiln.model.moe, "_grouped_mm_ok", lambda x, w: False)
    measured = measure(cfg, 4)["total"]  # the loop
    assert 0.95 <= loop / measured <= 1.10 and grouped / measured < 0.9, (loop, grouped, measured)
    assert estimate(cfg, "a100", 4)["memory_gib_per_gpu"] * 2 ** 30 == pytest.approx(loop)
    assert estimate(cfg, "h100", 4)["memory_gib_per_gpu"] * 2 ** 30 == pytest.approx(grouped)


def test_moe_activation_bytes_stay_positive_at_any_mlp_width():
    """The dense MLP share the ACT_* constants hold was measured at ffn/d 2.69; a MoE layer's
    routed experts replace that share, not one scaled with a wider MLP."""
    from kiln.planner.memory import activation_bytes_per_layer

    for ffn in (1408, 4096, 8192):
        for ac in ("none", "selective", "full"):
            cfg = load_config([], BASE + [f"model.ffn_dim={ffn}", "model.moe.n_experts=8", "model.moe.top_k=1"])
            assert activation_bytes_per_layer(cfg.model, 512, 1, 1, True, ac) > 0, (ffn, ac)


def test_measure_builds_the_gpu_optimizer():
    """`--measure` builds AdamW as a GPU run does (fused); the foreach kernel a CPU run of DTensor
    shards gets makes a temporary copy of the state at the step, which the formula adds only for
    `optim.fused: off` (YAML's false), and then reads above that measurement too."""
    from kiln.planner.measure import measure

    over = BASE + ["parallel.tp=2", "parallel.dp_shard=1", "train.micro_batch=1", "data.seq_len=256"]
    fused, foreach = (measure(load_config([], over + [f"optim.fused={mode}"]), 2)["total"] for mode in ("auto", "off"))
    assert foreach > 1.04 * fused  # measured 363 vs 341 MiB
    cfg = load_config([], over + ["optim.fused=off"])
    assert memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, 2))["total"] >= foreach


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


def test_measure_routes_moe_evenly_and_refuses_expert_parallelism():
    """MoE routing reads values; under fake tensors every expert takes an equal share (capped at its
    capacity). Expert parallelism exchanges the per-expert counts, so it is refused in one line."""
    from kiln.errors import KilnError
    from kiln.model.moe import MoEFeedForward
    from kiln.planner.measure import _balanced_assign, measure

    moe = BASE + ["model.moe.n_experts=4", "model.moe.top_k=2", "parallel.dp_shard=2", "train.micro_batch=2"]
    cfg = load_config([], moe)  # FSDP over 2: half of every fp32 parameter, all four experts included
    assert measure(cfg, 2)["weights"] == pytest.approx(4 * count_params(cfg.model) / 2, rel=0.02)
    layer = MoEFeedForward(load_config([], moe + ["model.moe.capacity_factor=0.5"]).model)
    order, counts = _balanced_assign(layer, torch.zeros(10, dtype=torch.long))
    assert counts.tolist() == [2, 2, 2, 2] and order.numel() == 8  # 10 assignments, capacity ceil(0.5*10/4) = 2
    with pytest.raises(KilnError, match="expert parallelism"):
        measure(load_config([], moe + ["parallel.ep=2"]), 2)


def test_estimate_measure_on_the_command_line(capsys):
    """`kiln estimate --measure`: progress on stderr (a large step takes CPU-minutes), clean JSON on
    stdout, and the verdict from the measured peak."""
    import json

    from kiln.cli import main

    over = BASE + ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch=2"]
    assert main(["estimate", *over, "--gpu", "h100", "--gpus", "2", "--measure", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["fits"] and result["measured_where"]["stage"] == 1 and result["measured_gib"]["total"] > 0
    assert "rank 0 (1 of 2)" in err and "rank 1 (2 of 2)" in err and err.count("done in") == 2


def test_measure_json_stays_json_with_deepspeed():
    """DeepSpeed logs to stdout when imported; `kiln estimate --measure --json` keeps stdout JSON (a
    fresh process, as a user runs it: the logger binds its stream at import)."""
    import json
    import subprocess
    import sys

    over = BASE + ["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.dp_shard=2"]
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "estimate", *over, "--gpu", "h100", "--gpus", "2",
                           "--measure", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["measured_gib"]["total"] > 0.9  # DeepSpeed's 0.93 GiB reduce bucket alone
