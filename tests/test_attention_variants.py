"""ALiBi and block-sparse attention: the slopes against Press et al.'s published values, the math
kernel against a per-query loop written from the definitions, sdpa against math, the attended
fraction against a hand count, the FLOPs that use it, and the config and export refusals."""
from __future__ import annotations

import math

import pytest
import torch

from kiln.config import AttentionPatternConfig, ModelConfig, load_config
from kiln.errors import ConfigError, KilnError
from kiln.model.attention import SparsePattern, alibi_slopes, attended_fraction, attention, causal_mask
from kiln.model.llama import Transformer, count_params, flops_per_token


def test_alibi_slopes_published():
    # Press et al. 2022, sec. 3: 8 heads -> 1/2 ... 1/256; 16 heads start at 2^-0.5 and halve every other head.
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(16), torch.tensor([2.0 ** (-(i + 1) / 2) for i in range(16)]))
    # Not a power of two: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (every other 16-head slope).
    twelve = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(twelve))


def allowed(kind, block, local, glob, stride, i, j) -> bool:
    """The pattern's definition, one (query, key) pair at a time."""
    if j > i:
        return False
    qb, kb = i // block, j // block
    if qb - kb < local:
        return True
    return kb < glob if kind == "local_global" else (qb - kb) % stride == 0


def loop_reference(q, k, v, slopes=None, pattern=None, doc_ids=None):
    """Attention for one query at a time, from the definitions (GQA by head // group)."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                keys = [j for j in range(i + 1)
                        if (pattern is None or allowed(pattern.kind, pattern.block, pattern.local,
                                                       pattern.global_blocks, pattern.stride, i, j))
                        and (doc_ids is None or doc_ids[bi, i] == doc_ids[bi, j])]
                scores = torch.stack([q[bi, i, hi] @ k[bi, j, hi // group] / math.sqrt(d) for j in keys])
                if slopes is not None:
                    scores = scores - slopes[hi] * torch.tensor([float(i - j) for j in keys])
                w = torch.softmax(scores, 0)
                out[bi, i, hi] = sum(w[n] * v[bi, j, hi // group] for n, j in enumerate(keys))
    return out


PATTERNS = {
    "dense": None,
    "strided": SparsePattern("strided", block=2, local=2, stride=3),
    "local_global": SparsePattern("local_global", block=3, local=1, global_blocks=1),
}


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("docs", [False, True])
def test_kernels_against_loop(alibi, pattern, docs):
    if not alibi and pattern == "dense":
        pytest.skip("plain causal attention: covered by test_model.py")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 13, 4, 8, generator=g), torch.randn(2, 13, 2, 8, generator=g), torch.randn(2, 13, 2, 8, generator=g)
    slopes = alibi_slopes(4) * 4 if alibi else None  # steeper than usual, so a wrong sign or offset shows
    doc_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13]) if docs else None
    want = loop_reference(q, k, v, slopes, PATTERNS[pattern], doc_ids)
    for backend in ("math", "sdpa"):
        got = attention(q, k, v, backend, doc_ids, alibi=slopes, pattern=PATTERNS[pattern])
        assert (got - want).abs().max().item() < 1e-5, backend


def test_flash_refuses_patterns():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(KilnError, match="block-sparse"):
        attention(q, q, q, "flash", pattern=PATTERNS["strided"])


def test_attended_pairs_hand_count():
    # 8 tokens, blocks of 2, band of 1 block plus 1 global block. Rows of query block 0: 1 + 2 = 3 keys;
    # each later query block: its own block causally (1 + 2) plus block 0 (2 + 2) = 7. Total 3 + 3 * 7 = 24
    # of the 36 causal pairs.
    lg = SparsePattern("local_global", block=2, local=1, global_blocks=1)
    assert lg.attended_pairs(8) == 24
    # Strided, 12 tokens, blocks of 2, band of 1, every 2nd block back: query blocks 0..5 see earlier blocks
    # {}, {}, {0}, {1}, {0, 2}, {1, 3}: 6 x 3 (own blocks) + 4 (2 + 2 per earlier block) x 6 = 18 + 24 = 42.
    st = SparsePattern("strided", block=2, local=1, stride=2)
    assert st.attended_pairs(12) == 42


@pytest.mark.parametrize("pattern", [SparsePattern("local_global", 3, 2, 2), SparsePattern("strided", 4, 2, 0, 3),
                                     SparsePattern("strided", 5, 1, 0, 1), SparsePattern("local_global", 7, 1, 0)])
@pytest.mark.parametrize("seq", [1, 10, 37])
def test_attended_pairs_equal_mask(pattern, seq):
    assert pattern.attended_pairs(seq) == int(causal_mask(seq, torch.device("cpu"), pattern=pattern).sum())


def test_flops_use_attended_fraction():
    m = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, attention_pattern=AttentionPatternConfig(
        "local_global", block=2, local_blocks=1, global_blocks=1))
    n = count_params(m) - 100 * 32
    assert flops_per_token(m, 8) == pytest.approx(6 * n + 12 * 2 * 4 * 8 * 8 * 24 / 36)
    # A sliding window of 3 over 8 tokens: 1 + 2 + 3 * 6 = 21 of 36 pairs.
    w = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, attention_window=3)
    assert attended_fraction(w, 8) == pytest.approx(21 / 36)
    assert flops_per_token(w, 8) == pytest.approx(6 * n + 12 * 2 * 4 * 8 * 8 * 21 / 36)


@pytest.mark.parametrize("override, key", [
    ("model.position=nope", "model.position"),
    ("model.attention_pattern.kind=banded", "model.attention_pattern.kind"),
    ("model.attention_pattern.block=0", "model.attention_pattern.block"),
    ("model.attention_pattern.local_blocks=0", "model.attention_pattern.local_blocks"),
])
def test_config_refusals(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], ["data.synthetic=markov", override])


def test_config_joint_refusals():
    with pytest.raises(ConfigError, match="model.attention_window"):
        load_config([], ["data.synthetic=markov", "model.attention_window=8", "model.attention_pattern.kind=strided"])
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        load_config([], ["data.synthetic=markov", "model.position=alibi", "model.rope_scaling.type=linear"])


@pytest.mark.parametrize("over, needle", [("model.position=alibi", "model.position=alibi has no"),
                                          ("model.attention_pattern.kind=strided", "attention_pattern.kind=strided")])
@pytest.mark.parametrize("to", ["hf", "megatron"])
def test_export_refused(tmp_path, over, needle, to):
    from kiln.convert.convert import convert
    from kiln.checkpoint.kiln_format import write_kiln_checkpoint

    cfg = load_config([], ["data.synthetic=markov", "model.vocab_size=64", "model.d_model=16", "model.n_layers=1",
                           "model.n_heads=2", over])
    write_kiln_checkpoint(Transformer(cfg.model).state_dict(), cfg, tmp_path / "run")
    with pytest.raises(KilnError, match=needle):
        convert(tmp_path / "run", to, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alibi_model_ignores_rope():
    """position=alibi takes RoPE out: the logits do not change when the RoPE table is scrambled."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                                    position="alibi", attention="math")).eval()
    tokens = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        before = model(tokens)
        model.rope.normal_()
        assert torch.equal(before, model(tokens))


def train_and_eval(position: str, train_len: int = 64, eval_len: int = 256, steps: int = 400) -> tuple[float, float]:
    """A tiny decoder trained at train_len on the switching-unigram source; mean eval loss over the
    trained positions and over the positions beyond them."""
    import torch.nn.functional as F

    from kiln.data.synthetic import switching_unigram

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=eval_len,
                                    attention="sdpa", position=position))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = switching_unigram(8, train_len + 1, 32, 24, g)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = switching_unigram(32, eval_len + 1, 32, 24, torch.Generator().manual_seed(99))
    with torch.no_grad():
        per = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(32, -1)
    return per[:, :train_len].mean().item(), per[:, train_len:].mean().item()


@pytest.mark.timeout(300)
def test_alibi_extrapolates_where_rope_degrades():
    """Trained at 64 tokens, evaluated at 256: ALiBi's loss beyond the trained length stays at its
    in-length loss; RoPE's rises (bench/extrapolation.py shows it at 128 -> 512 and longer training)."""
    alibi_in, alibi_out = train_and_eval("alibi")
    rope_in, rope_out = train_and_eval("rope")
    print(f"loss within / beyond the trained length: alibi {alibi_in:.3f} / {alibi_out:.3f}, "
          f"rope {rope_in:.3f} / {rope_out:.3f}")
    assert alibi_out < alibi_in * 1.02
    assert rope_out > rope_in * 1.04
    assert alibi_out < rope_out
