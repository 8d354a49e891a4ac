"""`kiln plan grow`: the growth schedule's FLOPs and dollars against numbers counted by hand
(6N + 12 L H Q T per token, Chowdhery et al. 2022 App. B; H100 SXM 989 dense bf16 TFLOP/s)."""
from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.errors import KilnError
from kiln.planner.growth import price_growth
from kiln.config import ModelConfig

SMALL = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=256)
LARGE = ModelConfig(vocab_size=1000, d_model=128, n_layers=4, n_heads=8, ffn_dim=256, max_seq_len=256)

# By hand. Small: output 1000*64 = 64,000; per layer q,k,v,o 4*64*64 = 16,384, SwiGLU 3*64*128 = 24,576,
# norms 128; two layers 82,176; final norm 64: N = 146,240 (the input embedding is a lookup, not counted).
# Attention 12*2*4*16*256 = 393,216. Per token 6*146,240 + 393,216 = 1,270,656.
SMALL_PER_TOKEN = 1_270_656
# Large: output 128,000; per layer 4*128^2 = 65,536 + 3*128*256 = 98,304 + 256 = 164,096; four layers 656,384;
# final norm 128: N = 784,512; attention 12*4*8*16*256 = 1,572,864. Per token 4,707,072 + 1,572,864.
LARGE_PER_TOKEN = 6_279_936


def test_schedule_against_hand_count():
    r = price_growth(SMALL, LARGE, 1e9, 3e9, 256, "h100", 8, mfu=0.5, price=2.0)
    small, grown = r["phases"]
    assert small["flops"] == pytest.approx(SMALL_PER_TOKEN * 1e9, rel=1e-12)
    assert grown["flops"] == pytest.approx(LARGE_PER_TOKEN * 3e9, rel=1e-12)
    assert r["scratch"]["flops"] == pytest.approx(LARGE_PER_TOKEN * 4e9, rel=1e-12)
    schedule = SMALL_PER_TOKEN * 1e9 + LARGE_PER_TOKEN * 3e9
    hours = schedule / (989e12 * 0.5) / 3600
    assert r["schedule"]["gpu_hours"] == pytest.approx(hours, rel=1e-9)
    assert r["schedule"]["cost_usd"] == pytest.approx(hours * 2.0, rel=1e-9)
    assert r["saving_fraction"] == pytest.approx(1 - schedule / (LARGE_PER_TOKEN * 4e9), rel=1e-9)


@pytest.mark.parametrize("large, needle", [
    (ModelConfig(vocab_size=1000, d_model=128, n_layers=4, n_heads=4, ffn_dim=256), "head_dim 32 differs"),
    (ModelConfig(vocab_size=2000, d_model=128, n_layers=4, n_heads=8, ffn_dim=256), "vocab_size"),
    (ModelConfig(vocab_size=1000, d_model=128, n_layers=1, n_heads=8, ffn_dim=256), "--n-layers 1 is smaller"),
])
def test_unreachable_pairs_refused(large, needle):
    with pytest.raises(KilnError, match=needle):
        price_growth(SMALL, large, 1e9, 1e9, 256, "h100", 8)


def test_cli_json(tmp_path, capsys):
    for name, m in (("s", SMALL), ("l", LARGE)):
        (tmp_path / f"{name}.yaml").write_text(
            "model:\n" + "".join(f"  {k}: {getattr(m, k)}\n" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim")))
    code = main(["plan", "grow", str(tmp_path / "s.yaml"), str(tmp_path / "l.yaml"), "--small-tokens", "1B",
                 "--large-tokens", "3B", "--gpu", "h100", "--gpus", "8", "--seq-len", "256", "--mfu", "0.5", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["schedule"]["flops"] == pytest.approx(SMALL_PER_TOKEN * 1e9 + LARGE_PER_TOKEN * 3e9, rel=1e-12)
    assert main(["plan", "grow", str(tmp_path / "s.yaml"), str(tmp_path / "nope.yaml"), "--small-tokens", "1B",
                 "--large-tokens", "3B", "--gpu", "h100", "--gpus", "8"]) == 2
    assert "config file not found" in capsys.readouterr().err
