"""Memory terms against hand-computed values; hardware table lookups."""
import pytest

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.hardware import lookup, peak_flops
from kiln.planner.memory import DDP_BUCKETS, Layout, activation_bytes_per_layer, memory_breakdown

# d 1024, 4 layers, 8 heads (MHA), ffn 2816, vocab 1000
M = ModelConfig(vocab_size=1000, d_model=1024, n_layers=4, n_heads=8, ffn_dim=2816, max_seq_len=512)
LAYER = 2 * 1024**2 + 2 * 1024 * 1024 + 3 * 1024 * 2816  # matrices per layer
S, B = 512, 2
SBH = S * B * 1024


def test_activation_rows_follow_korthikanti_with_measured_constants():
    from kiln.planner.memory import ACT_FULL, ACT_NONE, ACT_SELECTIVE

    assert activation_bytes_per_layer(M, S, B, 1, False, "none", flash=False) == SBH * (ACT_NONE + 5 * 8 * S / 1024)
    assert activation_bytes_per_layer(M, S, B, 1, False, "none", flash=True) == SBH * ACT_NONE
    assert activation_bytes_per_layer(M, S, B, 2, False, "none", flash=False) == pytest.approx(
        SBH * (ACT_NONE * 10 / 34 + ACT_NONE * 24 / 34 / 2 + 5 * 8 * S / (1024 * 2)))
    assert activation_bytes_per_layer(M, S, B, 2, True, "none", flash=False) == SBH * (ACT_NONE / 2 + 5 * 8 * S / (1024 * 2))
    assert activation_bytes_per_layer(M, S, B, 2, True, "selective", flash=False) == SBH * ACT_SELECTIVE / 2
    assert activation_bytes_per_layer(M, S, B, 1, False, "selective") == SBH * ACT_SELECTIVE  # saves at TP1 too
    assert activation_bytes_per_layer(M, S, B, 1, False, "full") == ACT_FULL * SBH


def test_breakdown_tp2_fsdp4_by_hand():
    lay = Layout(tp=2, pp=1, dp=4, micro_batch=B, activation_checkpoint="none", sequence_parallel=True)
    mem = memory_breakdown(M, S, lay, flash=False)
    p = 4 * (LAYER / 2 + 2 * 1024) + 2 * 1000 * 1024 / 2 + 1024  # params on one GPU before FSDP
    # native FSDP2: fp32 params (4 B) + fp32 grads (4 B) + Adam m, v (8 B), all sharded
    assert mem["weights"] == pytest.approx(4 * p / 4)
    assert mem["grads"] == pytest.approx(4 * p / 4)
    assert mem["optimizer"] == pytest.approx(8 * p / 4)
    assert mem["activations"] == pytest.approx(4 * SBH * (50 / 2 + 5 * 8 * S / 2048))
    # TP: measured 8.5 + 6/t bytes per logit, not 12/t
    assert mem["logits"] == pytest.approx((8.5 + 6 / 2) * S * B * 1000)
    assert mem["comm_buffers"] == pytest.approx(2 * 2 * LAYER / 2 + 4 * LAYER / 2 + 2 * SBH)
    # no accumulation: the peak is at the loss, before backward allocates gradients
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k not in ("total", "grads")))


def test_breakdown_pp2_1f1b_full_recompute_ddp():
    lay = Layout(tp=1, pp=2, dp=2, zero=0, micro_batch=B, pp_microbatches=8, activation_checkpoint="full",
                 sequence_parallel=False, engine="deepspeed")
    mem = memory_breakdown(M, S, lay)
    p = 2 * (LAYER + 2 * 1024) + 1000 * 1024 + 1024  # two layers and one table per stage
    # DeepSpeed bf16: 2 B weights and grads, 12 B fp32 master + Adam; ZeRO-0 shards nothing
    assert mem["weights"] == 2 * p and mem["grads"] == 2 * p and mem["optimizer"] == 12 * p
    # 1F1B: the first stage holds pp=2 micro-batches of 2 layers' inputs plus one layer live in
    # recompute; the last holds one micro-batch and the logits (12.5 sbV measured under DeepSpeed).
    # The last is the fuller here, so its terms are reported.
    first = 2 * 2 * 2.5 * SBH + 50 * SBH
    last, logits = 2 * 2.5 * SBH + 50 * SBH, 12.5 * S * B * 1000
    assert last + logits > first
    assert mem["activations"] == pytest.approx(last) and mem["logits"] == logits
    assert mem["comm_buffers"] == pytest.approx(DDP_BUCKETS + 2 * 2 * SBH)
    # GPipe: every stage holds all 8 micro-batches, so the last (with the logits) is the fuller one;
    # each of its 7 earlier micro-batches' losses keeps fp32 logits (4 bytes) for backward
    gpipe = memory_breakdown(M, S, Layout(**{**lay.__dict__, "schedule": "gpipe"}))
    assert gpipe["activations"] == pytest.approx(8 * 2 * 2.5 * SBH + 50 * SBH)
    assert gpipe["logits"] == pytest.approx(logits + 4 * 7 * S * B * 1000)


def test_zero_stages_shard_progressively():
    base = dict(tp=1, pp=1, dp=8, micro_batch=1, engine="deepspeed")
    z = {k: memory_breakdown(M, S, Layout(zero=k, **base)) for k in range(4)}
    assert z[1]["optimizer"] == z[0]["optimizer"] / 8 and z[1]["grads"] == z[0]["grads"]
    assert z[2]["grads"] == z[0]["grads"] / 8 and z[2]["weights"] == z[0]["weights"]
    assert z[3]["weights"] == z[0]["weights"] / 8


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("Tesla V100-SXM2-32GB", 125), ("NVIDIA B200", 2250), ("AMD Instinct MI300X", 1307),
    ("NVIDIA H100 NVL", None), ("NVIDIA GH200 480GB", None), ("NVIDIA L40S", None), ("cpu", None), ("", None),
    (None, None)])
def test_peak_flops_matches_device_names_and_never_guesses(name, tflops):
    assert peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_lookup_unknown_lists_known():
    assert lookup("H100-SXM").name == "h100"
    with pytest.raises(KilnError, match="known: .*h100.*h200"):
        lookup("rtx9090")


def test_short_sequences_peak_after_the_loss():
    """With few tokens per micro-batch the peak is not at the loss (measured, bench/planner_memory.py):
    under FSDP2 it is the embedding's dense gradient at the end of backward (10 bytes per entry, 14
    with accumulation); without FSDP, whole gradients built up beside the saved activations, which
    include autocast's bf16 copies of the weight matrices."""
    m = ModelConfig(vocab_size=32000, d_model=256, n_layers=2, n_heads=4, ffn_dim=704, max_seq_len=512)
    table, layer = 32000 * 256, 4 * 256**2 + 3 * 256 * 704
    state = ("weights", "grads", "optimizer")
    fsdp = memory_breakdown(m, 16, Layout(dp=4, micro_batch=1))
    assert fsdp["total"] == pytest.approx(sum(fsdp[k] for k in state) + 10 * table)
    accum = memory_breakdown(m, 16, Layout(dp=4, micro_batch=1, grad_accum=2))
    assert accum["total"] == pytest.approx(sum(accum[k] for k in state) + 14 * table)
    alone = memory_breakdown(m, 16, Layout(micro_batch=1))
    assert alone["total"] == pytest.approx(sum(alone[k] for k in (*state, "activations")))
    cached = alone["activations"] - memory_breakdown(m, 16, Layout(dp=2, micro_batch=1))["activations"]
    assert cached == pytest.approx(2 * (2 * layer + table))  # blocks and output; the lookup is not cast
    # long sequences still peak at the loss, before backward allocates gradients
    long = memory_breakdown(m, 4096, Layout(dp=4, micro_batch=4))
    assert long["total"] == pytest.approx(sum(v for k, v in long.items() if k not in ("total", "grads")))
