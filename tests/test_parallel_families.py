"""Real-checkpoint model options under tensor parallelism and FSDP2: explicit head_dim, q/k/v/o and MLP
biases (TP shards column-parallel biases with their rows and keeps row-parallel biases whole), RoPE
scaling and a sliding window. Oracle: the single-process model on the same batches (loss, every
gradient, grad norm, weights after AdamW steps), as in test_parallel_layouts. One spawn of 2 ranks."""
from __future__ import annotations

import functools

import pytest

from test_parallel_support import make_cfg, reference_run, rel_err, run_layouts

TOL, PARAM_TOL = 1e-5, 1e-4
VARIANTS = {
    # Llama options: attention_bias + mlp_bias, head_dim 32 != 64/4, llama3 RoPE scaling active below max_seq_len
    "llama_bias_head_dim": ["model.head_dim=32", "model.attention_bias=true", "model.mlp_bias=true",
                            "model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
                            "model.rope_scaling.original_max_position_embeddings=32"],
    # Mistral: sliding window shorter than the sequence, head_dim 24
    "mistral": ["model.head_dim=24", "model.attention_window=5"],
    # Qwen2: q/k/v biases, YaRN
    "qwen2": ["model.qkv_bias=true", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
              "model.rope_scaling.original_max_position_embeddings=16"],
}
LAYOUTS = {"tp2": ["parallel.tp=2"], "fsdp2": []}
CASES = [(v, lay) for v in VARIANTS for lay in LAYOUTS]


@functools.lru_cache(maxsize=None)
def results() -> dict:
    return run_layouts(2, [(f"{v}-{lay}", VARIANTS[v] + LAYOUTS[lay]) for v, lay in CASES])


@functools.lru_cache(maxsize=None)
def reference(variant: str, dp: int) -> dict:
    return reference_run(make_cfg(VARIANTS[variant]), dp)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant,layout", CASES)
def test_family_options_match_single_process(variant, layout):
    got = results()[f"{variant}-{layout}"]
    ref = reference(variant, got["dp_size"])
    assert set(got["grads"]) == set(ref["grads"])
    if variant != "mistral":
        assert any(n.endswith("attention.wq.bias") for n in ref["grads"])
    for name, g in ref["grads"].items():
        assert got["grads"][name].shape == g.shape, name
        assert rel_err(got["grads"][name], g) < TOL, f"grad {name}"
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / b < TOL, f"loss at step {step}: {a} vs {b}"
    for name, w in ref["params"].items():
        if name.endswith("wk.bias"):
            # The k bias's gradient nearly cancels (softmax ignores a per-query shift; only RoPE keeps it
            # from zero), so Adam's g/sqrt(v) turns rounding into steps: compare against the step size.
            assert (got["params"][name] - w).abs().max() < 1e-5, f"weight {name} after steps"
        else:
            assert rel_err(got["params"][name], w) < PARAM_TOL, f"weight {name} after steps"
