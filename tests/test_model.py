"""Model oracles: attention backends agree with the explicit math reference; the exact parameter
count matches the module; loss at init is about ln(vocab)."""
import math

import pytest
import torch

from kiln.config import ModelConfig, load_config
from kiln.errors import KilnError
from kiln.model import Transformer, count_params
from kiln.model.attention import attention, resolve_backend
from kiln.model.llama import apply_rope, rope_cache


def _qkv(heads=4, kv_heads=2, seq=24, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, dim, generator=g, requires_grad=True)
    k = torch.randn(2, seq, kv_heads, dim, generator=g, requires_grad=True)
    v = torch.randn(2, seq, kv_heads, dim, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("block_causal", [False, True])
def test_sdpa_matches_math_forward_and_backward(kv_heads, block_causal):
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14]) if block_causal else None
    grads = {}
    outs = {}
    for backend in ("math", "sdpa"):
        q, k, v = _qkv(kv_heads=kv_heads)
        out = attention(q, k, v, backend, doc_ids)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[backend], grads[backend] = out.detach(), [t.grad for t in (q, k, v)]
    assert (outs["sdpa"] - outs["math"]).abs().max() < 1e-5
    for a, b in zip(grads["sdpa"], grads["math"]):
        assert (a - b).abs().max() < 1e-5


def test_math_attention_is_causal_and_block_causal():
    q, k, v = _qkv(seq=8)
    base = attention(q, k, v, "math")
    v2 = v.detach().clone()
    v2[:, 5:] += 100.0  # future positions must not affect earlier outputs
    assert torch.allclose(attention(q, k, v2, "math")[:, :5], base[:, :5])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    v3 = v.detach().clone()
    v3[:, :3] += 100.0  # the first document must not leak into the second
    assert torch.allclose(attention(q, k, v3, "math", doc)[:, 3:], attention(q, k, v, "math", doc)[:, 3:])


def test_flash_is_a_clear_error_without_cuda():
    with pytest.raises(KilnError, match="flash cannot run here"):
        resolve_backend("flash", torch.device("cpu"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"


def test_rope_rotates_pairs_and_preserves_norm():
    cache = rope_cache(8, 16, 10000.0)
    x = torch.randn(1, 16, 2, 8)
    y = apply_rope(x, cache)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[:, 0], x[:, 0])  # position 0: no rotation
    # relative property: <R_m q, R_n k> depends on m - n only
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda t, pos: apply_rope(t.expand(1, 16, 1, 8).contiguous(), cache)[0, pos, 0]
    assert torch.allclose(rot(q, 5) @ rot(k, 3), rot(q, 9) @ rot(k, 7), atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_exact_param_count_equals_module(preset):
    cfg = load_config([f"configs/model/{preset}.yaml"], ["data.synthetic=markov"])
    assert count_params(cfg.model) == sum(p.numel() for p in Transformer(cfg.model).parameters())


def test_tied_embeddings_param_count():
    m = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    model = Transformer(m)
    assert model.output.weight is model.tok_embeddings.weight
    assert count_params(m) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,expected", [("8b", 8_030_261_248), ("70b", 70_553_706_496),
                                             ("405b", 405_853_388_800), ("1b", 1_235_814_400)])
def test_llama_presets_match_hugging_face_counts(preset, expected):
    cfg = load_config([f"configs/model/{preset}.yaml"], ["data.synthetic=markov"])
    assert count_params(cfg.model) == expected


def test_loss_at_init_is_about_ln_vocab():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4)
    model = Transformer(m)
    tokens = torch.randint(0, 1000, (4, 32))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_all_backends_give_same_model_output():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(m)
    tokens = torch.randint(0, 50, (2, 12))
    outs = {}
    for backend in ("math", "sdpa", "auto"):
        for layer in model.layers.values():
            layer.attention.backend = backend
        outs[backend] = model(tokens)
    assert (outs["sdpa"] - outs["math"]).abs().max() < 1e-5
    assert torch.equal(outs["auto"], outs["sdpa"])


@pytest.mark.parametrize("preset,expected", [("llama3.2-1b", 1_235_814_400), ("llama3.1-8b", 8_030_261_248),
                                             ("llama3.1-70b", 70_553_706_496), ("llama3.1-405b", 405_853_388_800)])
def test_llama3_presets_match_transformers_counts(preset, expected):
    """The published count, and transformers' own model built (on the meta device) from the
    config.json kiln would export for the preset: same count, same RoPE scaling."""
    transformers = pytest.importorskip("transformers")
    from kiln.convert.hf import hf_config

    cfg = load_config([f"configs/model/{preset}.yaml"], ["data.synthetic=markov"])
    assert count_params(cfg.model) == expected
    config = hf_config(cfg.model, torch.bfloat16, {})
    assert config["rope_parameters"]["rope_type"] == "llama3"
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert sum(p.numel() for p in hf.parameters()) == expected


@pytest.mark.parametrize("options", [dict(head_dim=24), dict(attention_bias=True, mlp_bias=True),
                                     dict(qkv_bias=True, tie_embeddings=True), dict(head_dim=8, qkv_bias=True)])
def test_variant_param_count_equals_module(options):
    m = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, **options)
    assert count_params(m) == sum(p.numel() for p in Transformer(m).parameters())


@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_sdpa_matches_math_and_masks(window, block_causal):
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14]) if block_causal else None
    outs, grads = {}, {}
    for backend in ("math", "sdpa"):
        q, k, v = _qkv(kv_heads=2)
        out = attention(q, k, v, backend, doc_ids, window)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[backend], grads[backend] = out.detach(), [t.grad for t in (q, k, v)]
    assert (outs["sdpa"] - outs["math"]).abs().max() < 1e-5
    for a, b in zip(grads["sdpa"], grads["math"]):
        assert (a - b).abs().max() < 1e-5
    # the window itself: query i ignores keys at i - window and earlier, sees i - window + 1
    q, k, v = _qkv(kv_heads=2)
    v2 = v.detach().clone()
    i = 20
    v2[:, i - window] += 100.0
    moved = attention(q, k, v2, "math", None, window)[:, i] - attention(q, k, v, "math", None, window)[:, i]
    assert moved.abs().max() == 0
    if window > 1:
        v3 = v.detach().clone()
        v3[:, i - window + 1] += 100.0
        assert (attention(q, k, v3, "math", None, window)[:, i] - attention(q, k, v, "math", None, window)[:, i]).abs().max() > 1


def test_window_covering_the_sequence_is_plain_causal():
    q, k, v = _qkv(kv_heads=2)
    assert torch.equal(attention(q, k, v, "sdpa", None, 24), attention(q, k, v, "sdpa"))
    assert torch.allclose(attention(q, k, v, "math", None, 23), attention(q, k, v, "math"), atol=1e-6) is False


def test_windowed_model_changes_only_beyond_the_window():
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, attention="sdpa", attention_window=6)
    windowed = Transformer(m)
    full = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, attention="sdpa"))
    full.load_state_dict(windowed.state_dict())
    tokens = torch.randint(0, 50, (1, 16))
    a, b = windowed(tokens), full(tokens)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_tie_survives_meta_materialization():
    """Training builds on the meta device and calls to_empty(), which gives each module a fresh
    Parameter; init_weights must tie them again or output and embedding drift apart in training."""
    m = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(m)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert count_params(m) == sum(p.numel() for p in model.parameters())


def test_rope_accepts_a_bf16_table():
    """FSDP's bf16 policy casts block inputs, the RoPE table included: rotation still works, and
    matches the fp32 table to bf16 precision."""
    from kiln.model.llama import apply_rope, rope_cache

    cache = rope_cache(16, 32, 10000.0)
    x = torch.randn(2, 32, 4, 16, generator=torch.Generator().manual_seed(0))
    got = apply_rope(x.bfloat16(), cache.bfloat16()).float()
    assert torch.allclose(got, apply_rope(x, cache), atol=5e-2)
