"""Function-preserving growth: every expansion alone and combined leaves the logits as they were
(the parent model itself is the oracle), the grown checkpoint trains on from the parent's loss,
and expansions that cannot keep the function are refused with the flag named."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from kiln.config import AttentionPatternConfig, ModelConfig, load_config
from kiln.errors import KilnError
from kiln.model.grow import GrowTarget, grow_state, head_slots
from kiln.model.llama import Transformer

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
            attention="math")


def parent(**over) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **over})).eval()
    with torch.no_grad():  # norms away from 1 and nonzero biases, so a wrong scale or slot shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    return model


def grown_logits_diff(model: Transformer, target: GrowTarget) -> tuple[float, ModelConfig]:
    state, cfg = grow_state(model.state_dict(), model.cfg, target, seed=1)
    child = Transformer(cfg).eval()
    child.load_state_dict(state, strict=True)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (child(tokens) - model(tokens)).abs().max().item(), cfg


CASES = {
    "d_model": (dict(), GrowTarget(d_model=48)),
    "ffn_dim": (dict(), GrowTarget(ffn_dim=80)),
    "n_heads": (dict(), GrowTarget(n_heads=8)),
    "n_kv_heads": (dict(), GrowTarget(n_kv_heads=4)),
    "n_heads_and_kv_mha": (dict(n_kv_heads=None), GrowTarget(n_heads=8, n_kv_heads=8)),
    "n_layers_even": (dict(), GrowTarget(n_layers=5)),
    "n_layers_insert_at": (dict(), GrowTarget(n_layers=5, insert_at=[0, 2, 2])),
    "combined": (dict(), GrowTarget(d_model=64, ffn_dim=96, n_heads=8, n_kv_heads=4, n_layers=4)),
    "combined_biases": (dict(attention_bias=True, mlp_bias=True),
                        GrowTarget(d_model=48, ffn_dim=64, n_heads=6, n_kv_heads=2, n_layers=3, insert_at=[1])),
    "combined_qkv_bias_tied": (dict(qkv_bias=True, tie_embeddings=True), GrowTarget(d_model=64, n_heads=8, n_layers=3)),
    "explicit_head_dim": (dict(head_dim=12), GrowTarget(d_model=40, n_heads=6)),
    "alibi_sparse_width_depth": (dict(position="alibi", attention_pattern=AttentionPatternConfig("strided", 4, 1, 0, 2)),
                                 GrowTarget(d_model=48, ffn_dim=64, n_kv_heads=4, n_layers=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expansion_preserves_logits(case):
    over, target = CASES[case]
    model = parent(**over)
    diff, cfg = grown_logits_diff(model, target)
    print(f"{case}: max |logit diff| = {diff:.2e}, {sum(p.numel() for p in model.parameters())} -> "
          f"{sum(p.numel() for p in Transformer(cfg).parameters())} parameters")
    assert diff <= 1e-5
    assert cfg.dim_per_head == model.cfg.dim_per_head  # RoPE frequencies depend on it: never changed
    for field in ("d_model", "n_heads", "n_layers"):
        want = getattr(target, field)
        assert want is None or getattr(cfg, field) == want


def test_zeroed_writes_are_what_preserve():
    """The oracle can fail: a nonzero new column of w2 (what a wrong construction would leave) moves the logits."""
    model = parent()
    state, cfg = grow_state(model.state_dict(), model.cfg, GrowTarget(ffn_dim=80), seed=1)
    state["layers.0.feed_forward.w2.weight"][:, -1] = 0.5
    child = Transformer(cfg).eval()
    child.load_state_dict(state)
    tokens = torch.arange(20)[None] % BASE["vocab_size"]
    with torch.no_grad():
        assert (child(tokens) - model(tokens)).abs().max().item() > 1e-3


def test_gqa_slots_keep_each_query_head_on_its_kv_head():
    old = ModelConfig(**{**BASE, "n_heads": 4, "n_kv_heads": 2})
    new = dataclasses.replace(old, n_heads=12, n_kv_heads=6)
    slots, kv_source = head_slots(old, new)
    old_group, new_group = 2, 2
    for h, slot in enumerate(slots):
        assert kv_source[slot // new_group] == h // old_group
    assert len(set(slots)) == len(slots)


@pytest.mark.parametrize("target, over, needle", [
    (GrowTarget(d_model=16), {}, "--d-model 16 is smaller"),
    (GrowTarget(n_layers=1), {}, "--n-layers 1 is smaller"),
    (GrowTarget(n_kv_heads=3, n_heads=6), {}, "--n-kv-heads 3 is not a multiple"),
    (GrowTarget(n_heads=6, n_kv_heads=4), {}, "--n-heads 6 is not divisible"),
    (GrowTarget(n_layers=4, insert_at=[1]), {}, "--insert-at names 1 positions"),
    (GrowTarget(insert_at=[3]), {}, "--insert-at 3 is outside 0..2"),
    (GrowTarget(), {}, "nothing to grow"),
    (GrowTarget(d_model=32, ffn_dim=48), {}, "nothing to grow"),
    (GrowTarget(n_heads=8), {"position": "alibi"}, "--n-heads: model.position=alibi"),
])
def test_refusals(target, over, needle):
    model = parent(**over)
    with pytest.raises(KilnError, match=needle.replace("-", r"\-").replace(".", r"\.")):
        grow_state(model.state_dict(), model.cfg, target)


TRAIN = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "model.attention=math", "data.synthetic=markov", "data.synthetic_vocab=32",
         "data.seq_len=16", "train.micro_batch=8", "train.eval_every=0", "logging.tensorboard=false",
         "logging.progress=false", "logging.log_every=1", "optim.lr=3e-3", "optim.warmup_steps=2"]


def kiln_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300)


def first_loss(run_dir) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.timeout(300)
def test_grow_cli_then_train_on(tmp_path, capsys):
    """A trained parent grown by the CLI continues at the parent's loss (the same first batch through
    both models), far below a fresh model's, with a fresh optimizer at step 0."""
    from kiln.train import train

    train(load_config([], [*TRAIN, f"train.run_dir={tmp_path}", "train.name=base", "train.steps=60",
                           "checkpoint.every=60"]))
    proc = kiln_cli("grow", str(tmp_path / "base"), "--out", str(tmp_path / "big"), "--d-model", "48",
                    "--ffn-dim", "96", "--n-heads", "6", "--n-layers", "3", "--insert-at", "1")
    assert proc.returncode == 0, proc.stderr
    assert "optimizer state: reset" in proc.stdout
    grown_cfg = tmp_path / "big" / "config.yaml"
    more = ["train.steps=1", "checkpoint.enabled=false", "optim.warmup_steps=0"]
    train(load_config([], [*TRAIN, *more, f"train.run_dir={tmp_path}", "train.name=cont",
                           f"checkpoint.init_from={tmp_path / 'base'}"]))
    train(load_config([grown_cfg], more))
    assert "weights only: the optimizer state is reset" in capsys.readouterr().out
    train(load_config([grown_cfg], [*more, "train.name=viainit", f"checkpoint.init_from={tmp_path / 'big'}"]))
    assert "the optimizer state is reset and training starts at step 0" in capsys.readouterr().out
    assert first_loss(tmp_path / "viainit") == first_loss(tmp_path / "big")
    train(load_config([], [*TRAIN, *more, f"train.run_dir={tmp_path}", "train.name=fresh"]))
    parent_loss, grown_loss = first_loss(tmp_path / "cont"), first_loss(tmp_path / "big")
    fresh = first_loss(tmp_path / "fresh")
    print(f"first loss: parent {parent_loss:.6f}, grown {grown_loss:.6f}, fresh model {fresh:.4f}")
    assert abs(parent_loss - grown_loss) < 1e-4
    assert grown_loss < fresh - 0.5
    meta = json.loads((tmp_path / "big" / "checkpoints" / "step_00000000" / "meta.json").read_text())
    assert meta["model_only"] and meta["source"] == "kiln grow"


def test_grow_cli_errors(tmp_path):
    proc = kiln_cli("grow", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--d-model", "64")
    assert proc.returncode == 2 and "no complete kiln checkpoint" in proc.stderr
    proc = kiln_cli("grow", str(tmp_path), "--out", str(tmp_path / "o"), "--insert-at", "1,x")
    assert proc.returncode == 2 and "--insert-at" in proc.stderr
