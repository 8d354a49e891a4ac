"""Equivalence oracle: every layout's loss, full gradients (DTensor shards gathered, matched by
FQN) and grad norm equal the plain single-process model on the same global batch, in fp32, and
keep matching over a few AdamW steps with grad accumulation and clipping.

All layouts of one world size run in one spawned process group (several meshes in a row), so
the whole file costs three spawns.
"""
from __future__ import annotations

import functools

import pytest

from test_parallel_support import assert_matches_reference, make_cfg, reference_run, run_layouts

TOL = 1e-5          # loss, first-step gradients and grad norms
PARAM_TOL = 1e-4    # weights after 4 AdamW steps: Adam's g/sqrt(v) amplifies 1e-7 gradient noise

TWO = {
    "tp2": "parallel.tp=2 parallel.sequence_parallel=false",
    "tp2_sp_selective_ac": "parallel.tp=2 parallel.activation_checkpoint=selective",
    "fsdp2_full_ac": "parallel.activation_checkpoint=full",
    "fsdp2_selective_ac": "parallel.activation_checkpoint=selective",
    "fsdp2_no_reshard": "parallel.reshard_after_forward=false",
    "pp2_gpipe": "parallel.pp=2 parallel.pp_schedule=gpipe",
    "pp2_1f1b": "parallel.pp=2 parallel.pp_schedule=1f1b parallel.pp_microbatches=4",
    "pp2_interleaved_1f1b": "parallel.pp=2 parallel.pp_schedule=interleaved_1f1b parallel.pp_virtual_stages=2",
    "pp2_zero_bubble": "parallel.pp=2 parallel.pp_schedule=zero_bubble",
}
FOUR = {
    "hsdp_2x2": "parallel.dp_replicate=2 parallel.dp_shard=2",
    "pp2_tp2": "parallel.pp=2 parallel.tp=2",
    "fsdp2_tp2": "parallel.tp=2",
}
EIGHT = {
    "pp2_dp2_tp2": "parallel.pp=2 parallel.dp_shard=2 parallel.tp=2 parallel.pp_schedule=interleaved_1f1b "
                   "parallel.pp_virtual_stages=2",
}
WORLD = {**{k: 2 for k in TWO}, **{k: 4 for k in FOUR}, **{k: 8 for k in EIGHT}}
OVERRIDES = {**TWO, **FOUR, **EIGHT}


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    table = {2: TWO, 4: FOUR, 8: EIGHT}[world]
    return run_layouts(world, [(name, ov.split()) for name, ov in table.items()])


@functools.lru_cache(maxsize=None)
def reference(dp: int) -> dict:
    return reference_run(make_cfg(), dp)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(OVERRIDES))
def test_layout_matches_single_process(layout):
    got = results(WORLD[layout])[layout]
    ref = reference(got["dp_size"])
    assert_matches_reference(got, ref, TOL, PARAM_TOL)
