"""Single-process paths of setup_parallel: torch.compile per block (with selective activation
checkpointing) and bf16 autocast give the eager fp32 model's loss and gradients."""
from __future__ import annotations

import pytest

from kiln.model.llama import Transformer
from kiln.parallel import setup_parallel

from test_parallel_support import batch_for, make_cfg, rel_err


def _loss_and_grads(overrides):
    cfg = make_cfg(overrides)
    rt = setup_parallel(cfg, Transformer(cfg.model), 1, 0)
    batch = batch_for(0, 0, 0, cfg)
    loss = rt.forward_backward(batch, 1.0)
    grads = {n: p.grad.float().clone() for n, p in rt.model_parts[0].named_parameters()}
    return float(loss), grads, rt


@pytest.mark.timeout(600)
def test_compile_with_selective_checkpointing_matches_eager():
    loss, grads, _ = _loss_and_grads([])
    c_loss, c_grads, rt = _loss_and_grads(["parallel.compile=true", "parallel.activation_checkpoint=selective"])
    assert abs(c_loss - loss) / loss < 1e-5
    assert set(c_grads) == set(grads), "compile and checkpointing keep parameter names"
    for name, g in grads.items():
        assert rel_err(c_grads[name], g) < 1e-4, name
    assert rt.model_parts[0].layers["0"]._compiled_call_impl is not None


def test_bf16_autocast_is_close_to_fp32():
    loss, grads, _ = _loss_and_grads([])
    b_loss, b_grads, rt = _loss_and_grads(["parallel.mixed_precision=bf16"])
    assert abs(b_loss - loss) / loss < 2e-2
    assert rel_err(b_grads["output.weight"], grads["output.weight"]) < 5e-2
    assert b_loss != loss, "bf16 compute actually ran"
    assert rt.eval_loss(batch_for(0, 0, 0, make_cfg())) is not None


@pytest.mark.parametrize("mode,runs", [("none", 1), ("full", 2), ("selective", 2)])
def test_recompute_reruns_each_block_in_backward(mode, runs):
    """Activation checkpointing is applied, not just accepted: with recompute the blocks' forward runs
    again in backward (the loss and gradients are checked above and in the layout tests)."""
    cfg = make_cfg([f"parallel.activation_checkpoint={mode}"])
    rt = setup_parallel(cfg, Transformer(cfg.model), 1, 0)
    calls = []
    for block in rt.model_parts[0].layers.values():
        block.attention.register_forward_hook(lambda *_: calls.append(1))
    rt.forward_backward(batch_for(0, 0, 0, cfg), 1.0)
    assert len(calls) == runs * len(rt.model_parts[0].layers)
