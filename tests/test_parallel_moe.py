"""MoE under every parallel layout kiln supports for it equals the single process (loss, every
gradient with the aux and z losses in it, grad norm, weights after AdamW steps), as in
test_parallel_layouts: FSDP2, TP2 (experts replicated over TP, shared experts split), expert parallel (all-to-all dispatch) alone and with FSDP2 over the
experts, and PP2 with four micro-batches (the aux loss must not depend on how the pipeline cuts
the batch). Two spawns (2 and 4 ranks)."""
from __future__ import annotations

import functools

import pytest

from test_parallel_support import make_cfg, reference_run, rel_err, run_layouts

TOL, PARAM_TOL = 1e-5, 1e-4
MOE = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_weight=0.1", "model.moe.z_loss_weight=0.01"]
VARIANTS = {
    "every_layer": MOE,
    "shared_every_2nd": MOE + ["model.moe.shared_experts=1", "model.moe.every_n_layers=2"],
}
LAYOUTS = {  # name: (world, variant, overrides)
    "fsdp2": (2, "shared_every_2nd", []),
    "ep2": (2, "every_layer", ["parallel.ep=2"]),
    "pp2_1f1b": (2, "every_layer", ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4"]),
    "tp2": (2, "shared_every_2nd", ["parallel.tp=2"]),
    "tp2_no_sp": (2, "every_layer", ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "ep2_fsdp2": (4, "every_layer", ["parallel.ep=2"]),
    "ep2_fsdp2_shared": (4, "shared_every_2nd", ["parallel.ep=2", "parallel.activation_checkpoint=full"]),
    "fsdp2_tp2": (4, "shared_every_2nd", ["parallel.tp=2"]),
    "ep2_tp2": (4, "shared_every_2nd", ["parallel.ep=2", "parallel.tp=2"]),
    "pp2_ep2": (4, "every_layer", ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=gpipe"]),
    "pp2_tp2": (4, "every_layer", ["parallel.pp=2", "parallel.tp=2"]),
}


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    return run_layouts(world, [(name, VARIANTS[v] + ov) for name, (w, v, ov) in LAYOUTS.items() if w == world])


@functools.lru_cache(maxsize=None)
def reference(variant: str, dp: int) -> dict:
    return reference_run(make_cfg(VARIANTS[variant]), dp)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_single_process(layout):
    world, variant, _ = LAYOUTS[layout]
    got = results(world)[layout]
    ref = reference(variant, got["dp_size"])
    assert set(got["grads"]) == set(ref["grads"])
    assert any("experts" in n for n in ref["grads"]) and any("router" in n for n in ref["grads"])
    for name, g in ref["grads"].items():
        assert got["grads"][name].shape == g.shape, name
        assert rel_err(got["grads"][name], g) < TOL, f"grad {name}: {rel_err(got['grads'][name], g)}"
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / b < TOL, f"loss at step {step}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
        assert abs(a - b) / b < TOL, f"grad norm at step {step}: {a} vs {b}"
    for name, w in ref["params"].items():
        assert rel_err(got["params"][name], w) < PARAM_TOL, f"weight {name} after steps"
