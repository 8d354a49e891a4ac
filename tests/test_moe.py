"""MoE layer and model against independent oracles: a naive per-token loop in float64 for the
layer's output, gates, capacity drops, aux and z losses and gradients; the parameter count
against the built model; the config's ranges and rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.model.llama import Transformer, count_params, flops_per_token
from kiln.model.moe import MoEFeedForward, moe_layers, set_aux_loss_scale

BASE = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=16",
        "model.max_seq_len=32", "data.seq_len=8", "data.synthetic=markov", "model.attention=math"]


def moe_cfg(*extra):
    return load_config([], BASE + ["model.moe.n_experts=4", "model.moe.top_k=2", *extra])


def naive_moe(layer: MoEFeedForward, x: torch.Tensor):
    """Token by token in float64: output, balance loss and z-loss, written from the formulas."""
    x = x.double()
    bsz, seq, _ = x.shape
    router = layer.router.weight.double()
    w1, w3, w2 = (p.double() for p in (layer.experts.w1, layer.experts.w3, layer.experts.w2))
    n_tok = bsz * seq
    cap = None if layer.capacity_factor is None else \
        max(1, math.ceil(layer.capacity_factor * n_tok * layer.top_k / layer.n_experts))
    used = [0] * layer.n_experts
    out = torch.zeros_like(x)
    balance, z = 0.0, 0.0
    for b in range(bsz):
        share = torch.zeros(layer.n_experts, dtype=torch.float64)
        prob_sum = torch.zeros(layer.n_experts, dtype=torch.float64)
        for s in range(seq):
            t = x[b, s]
            logits = router @ t
            prob_sum = prob_sum + logits.softmax(-1)
            z = z + torch.logsumexp(logits, -1) ** 2
            top = torch.topk(logits, layer.top_k)
            gates = torch.exp(top.values - top.values.max())
            gates = gates / gates.sum()
            for g, e in zip(gates, top.indices.tolist()):
                share[e] += 1
                if cap is not None:
                    if used[e] >= cap:
                        continue
                    used[e] += 1
                out[b, s] = out[b, s] + g * (w2[e] @ (F.silu(w1[e] @ t) * (w3[e] @ t)))
            if layer.shared is not None:
                sh = layer.shared
                out[b, s] = out[b, s] + sh.w2.weight.double() @ (F.silu(sh.w1.weight.double() @ t) * (sh.w3.weight.double() @ t))
        balance = balance + layer.n_experts * ((share / (seq * layer.top_k)) * (prob_sum / seq)).sum()
    return out, balance / bsz, z / n_tok


def layer_and_input(*extra, seed=0):
    cfg = moe_cfg(*extra)
    torch.manual_seed(seed)
    layer = MoEFeedForward(cfg.model)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 8, cfg.model.d_model)
    return layer, x


@pytest.mark.parametrize("extra,grouped", [
    ((), None), ((), False), (("model.moe.shared_experts=1",), None), (("model.moe.top_k=1",), False),
    (("model.moe.capacity_factor=0.5",), None), (("model.moe.capacity_factor=0.5",), False),
])
def test_layer_matches_naive_per_token_reference(extra, grouped):
    layer, x = layer_and_input(*extra)
    layer.experts.use_grouped_mm = grouped
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out = layer(x)
    ref_out, ref_balance, ref_z = naive_moe(layer, x64)
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert abs(float(layer.stats["aux_loss"]) - float(ref_balance)) < 1e-5
    assert abs(float(layer.stats["z_loss"]) - float(ref_z)) < 1e-4 * float(ref_z)
    # Gradients: output plus both weighted losses, through the layer and through the naive loop.
    g = torch.randn_like(out)
    set_aux_loss_scale(layer, 0.0)
    total = (layer(x) * g).sum() + layer.aux_loss
    total.backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref_out, ref_balance, ref_z = naive_moe(layer, x64)
    ref_total = (ref_out * g.double()).sum() + layer.aux_loss_weight * ref_balance + layer.z_loss_weight * ref_z
    ref_total.backward()
    for name, p in layer.named_parameters():
        assert (got[name].double() - p.grad).abs().max() < 1e-5 * max(1.0, float(p.grad.abs().max())), name


def test_dropless_keeps_every_assignment_and_capacity_drops_some():
    layer, x = layer_and_input("model.moe.capacity_factor=0.25")
    dropped = layer(x)
    layer.capacity_factor = None
    full = layer(x)
    assert not torch.allclose(dropped, full)
    assert float(layer.stats["load"].sum()) == pytest.approx(1.0)


def test_aux_loss_reaches_gradient_without_the_loss_function():
    """ce.backward() with the injected aux gradient equals (ce + sum of aux losses).backward()."""
    cfg = moe_cfg("model.moe.aux_loss_weight=0.5", "model.moe.z_loss_weight=0.1", "model.moe.every_n_layers=1")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    tokens = torch.randint(0, 64, (2, 9))

    def grads(scale, explicit):
        model.zero_grad()
        set_aux_loss_scale(model, scale)
        ce = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss = ce + sum(m.aux_loss for m in moe_layers(model)) if explicit else ce
        (loss * 0.25).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    injected, explicit = grads(0.25, False), grads(0.0, True)
    router = "layers.0.feed_forward.router.weight"
    assert injected[router].abs().max() > 0
    for name in explicit:
        assert torch.allclose(injected[name], explicit[name], atol=1e-7, rtol=1e-5), name
    without = grads(0.0, False)
    assert not torch.allclose(without[router], explicit[router]), "aux losses change the router's gradient"


def test_balance_loss_is_per_sequence_so_batch_splits_do_not_change_it():
    layer, x = layer_and_input()
    layer(x)
    whole = float(layer.stats["aux_loss"])
    parts = []
    for chunk in x.split(1):
        layer(chunk)
        parts.append(float(layer.stats["aux_loss"]))
    assert whole == pytest.approx(sum(parts) / len(parts), rel=1e-6)


@pytest.mark.parametrize("extra", [(), ("model.moe.shared_experts=2", "model.moe.every_n_layers=2"),
                                   ("model.tie_embeddings=true",)])
def test_count_params_counts_every_expert_and_flops_count_active_ones(extra):
    cfg = moe_cfg(*extra)
    model = Transformer(cfg.model)
    assert count_params(cfg.model) == sum(p.numel() for p in model.parameters())
    m, moe = cfg.model, cfg.model.moe
    expert = 3 * m.d_model * m.ffn_hidden
    inactive = m.n_moe_layers * (moe.n_experts - moe.top_k) * expert
    assert count_params(m, active=True) == count_params(m) - inactive
    dense = load_config([], BASE + list(x for x in extra if "moe" not in x))
    assert flops_per_token(m, 8) > flops_per_token(dense.model, 8)
    assert flops_per_token(m, 8) - flops_per_token(dense.model, 8) == \
        6 * m.n_moe_layers * ((moe.top_k + moe.shared_experts - 1) * expert + m.d_model * moe.n_experts)


@pytest.mark.parametrize("override,key", [
    ("model.moe.n_experts=1", "model.moe.n_experts"),
    ("model.moe.top_k=0", "model.moe.top_k"),
    ("model.moe.top_k=5", "model.moe.top_k"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor"),
    ("model.moe.capacity_factor=nan", "model.moe.capacity_factor"),
    ("model.moe.aux_loss_weight=-1", "model.moe.aux_loss_weight"),
    ("model.moe.z_loss_weight=inf", "model.moe.z_loss_weight"),
    ("model.moe.every_n_layers=3", "model.moe.every_n_layers"),
    ("model.moe.shared_experts=-1", "model.moe.shared_experts"),
    ("model.mlp_bias=true", "model.mlp_bias"),
    ("parallel.ep=3", "parallel.ep"),
    ("parallel.ep=2 parallel.dp_replicate=2", "parallel.ep"),
    ("parallel.ep=2 parallel.dp_shard=3", "parallel.ep"),
    ("parallel.ep=0", "parallel.ep"),
    ("parallel.tp=2 parallel.init=sharded", "parallel.init"),
    ("parallel.cp=2", "model.moe"),
    ("parallel.ep=2 parallel.activation_checkpoint=selective", "parallel.activation_checkpoint"),
])
def test_bad_moe_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        moe_cfg(*override.split())
    assert key in str(err.value)


def test_ep_needs_a_moe_model_and_must_divide_dp():
    with pytest.raises(ConfigError, match="parallel.ep"):
        load_config([], BASE + ["parallel.ep=2"])
    from kiln.distributed import parallel_dims

    with pytest.raises(ConfigError, match="parallel.ep"):
        parallel_dims(moe_cfg("parallel.ep=4"), 2)
    assert parallel_dims(moe_cfg("parallel.ep=2"), 4).ep == 2


def test_moe_model_trains_and_logs_router_metrics(tmp_path):
    import json

    from kiln.train import train

    cfg = load_config([], ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                           "model.ffn_dim=32", "model.moe.n_experts=4", "model.moe.top_k=2", "data.synthetic=markov",
                           "data.synthetic_vocab=16", "data.seq_len=16", "train.micro_batch=8", "train.steps=40",
                           "train.eval_every=0", "checkpoint.enabled=false", "logging.log_every=10",
                           "logging.tensorboard=false", "logging.progress=false", f"train.run_dir={tmp_path}"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    for r in rows:
        assert len(r["moe_load"]) == 4 and sum(r["moe_load"]) == pytest.approx(1.0, abs=1e-4)
        assert r["moe_load_max"] == pytest.approx(4 * max(r["moe_load"]), rel=1e-4)
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0


def test_planner_memory_counts_every_expert():
    from kiln.planner.memory import stage_params

    moe, dense = moe_cfg("model.moe.every_n_layers=2").model, load_config([], BASE).model
    expert = 3 * moe.d_model * moe.ffn_hidden
    assert stage_params(moe, 1, 1) - stage_params(dense, 1, 1) == \
        moe.n_moe_layers * ((moe.moe.n_experts - 1) * expert + moe.d_model * moe.moe.n_experts)
    assert stage_params(moe, 1, 1) == count_params(moe)


@pytest.mark.parametrize("extra,key", [("model.moe.every_n_layers=2", "every_n_layers"),
                                       ("model.moe.shared_experts=1", "shared_experts"),
                                       ("model.qkv_bias=true", "bias")])
def test_hf_export_refuses_what_mixtral_cannot_hold(extra, key):
    from kiln.convert.hf import hf_family
    from kiln.errors import KilnError

    assert hf_family(moe_cfg().model) == "mixtral"
    with pytest.raises(KilnError, match=key):
        hf_family(moe_cfg(extra).model)


def test_megatron_export_of_a_moe_model_is_refused():
    from kiln.convert.convert import refuse_unexportable
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="model.moe"):
        refuse_unexportable(moe_cfg().model, "megatron")


def test_estimate_prices_active_parameters_and_stores_all():
    from kiln.planner.estimate import estimate

    moe, dense = moe_cfg(), load_config([], BASE)
    got, ref = estimate(moe, "h100", 8), estimate(dense, "h100", 8)
    assert got["params"] == count_params(moe.model) > got["active_params"] == count_params(moe.model, active=True)
    # cost follows active FLOPs; weights memory follows all parameters
    assert got["gpu_hours"] / ref["gpu_hours"] == pytest.approx(
        flops_per_token(moe.model, 8) / flops_per_token(dense.model, 8), rel=1e-9)
    assert got["memory_breakdown_gib"]["weights"] > ref["memory_breakdown_gib"]["weights"]
