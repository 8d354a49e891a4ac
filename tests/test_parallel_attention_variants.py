"""ALiBi and block-sparse attention under tensor parallelism (TP2, gloo): each rank holds half the
heads, so each must apply its own heads' slopes. Loss, gradients and weights after a few AdamW
steps equal the single-process model's (the same harness and tolerances as test_parallel_layouts)."""
from __future__ import annotations

import pytest

from test_parallel_layouts import PARAM_TOL, TOL
from test_parallel_support import make_cfg, reference_run, rel_err, run_layouts

VARIANTS = {
    "tp2_alibi": "model.position=alibi",
    "tp2_sp_alibi_strided": "model.position=alibi model.attention_pattern.kind=strided model.attention_pattern.block=4 "
                            "model.attention_pattern.stride=2",
}
LAYOUT = {"tp2_alibi": "parallel.tp=2 parallel.sequence_parallel=false", "tp2_sp_alibi_strided": "parallel.tp=2"}


@pytest.fixture(scope="module")
def results():
    return run_layouts(2, [(name, (LAYOUT[name] + " " + model).split()) for name, model in VARIANTS.items()])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tp2_matches_single_process(results, name):
    got = results[name]
    ref = reference_run(make_cfg(VARIANTS[name].split()), got["dp_size"])
    plain = reference_run(make_cfg(), got["dp_size"])
    assert abs(plain["losses"][0] - ref["losses"][0]) > 1e-3, "the variant changes the model (else this proves nothing)"
    for n, g in ref["grads"].items():
        assert rel_err(got["grads"][n], g) < TOL, f"grad {n}"
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / b < TOL, f"loss at step {step}: {a} vs {b}"
    for n, w in ref["params"].items():
        assert rel_err(got["params"][n], w) < PARAM_TOL, f"weight {n} after steps"
