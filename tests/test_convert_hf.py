"""kiln <-> Hugging Face Llama. Oracle: `transformers.LlamaForCausalLM` (an independent Llama
implementation, rotate-half RoPE) must produce kiln's logits from the converted files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln.convert.convert import convert
from kiln.checkpoint.kiln_format import KilnCheckpointReader, write_kiln_checkpoint
from kiln.config import Config, ModelConfig
from kiln.errors import KilnError
from kiln.model.llama import Transformer

transformers = pytest.importorskip("transformers")

CASES = {
    "gqa": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6),
    "tied": dict(n_heads=4, n_kv_heads=None, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5),
    "gqa_tied": dict(n_heads=8, n_kv_heads=2, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5),
}


def make_model(**kw) -> tuple[Transformer, Config]:
    m = ModelConfig(vocab_size=512, d_model=64, n_layers=2, max_seq_len=64, attention="math", **kw)
    cfg = Config(model=m)
    cfg.data.seq_len = 32
    torch.manual_seed(0)
    model = Transformer(m)
    with torch.no_grad():  # norms are ones after init: perturb them so a swapped norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_logits_match_kiln(tmp_path, case):
    model, cfg = make_model(**CASES[case])
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    shard = "20KB" if case == "gqa" else "5GB"
    convert(tmp_path / "run", "hf", tmp_path / "hf", max_shard_size=shard)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    if case == "gqa":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    else:
        assert "model.safetensors" in files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    m = cfg.model
    assert config["num_key_value_heads"] == m.kv_heads
    assert config["tie_word_embeddings"] == m.tie_embeddings
    assert config["rope_theta"] == m.rope_theta and config["rms_norm_eps"] == m.norm_eps
    assert ("lm_head.weight" in read_safetensors(tmp_path / "hf")) != m.tie_embeddings

    tokens = torch.randint(0, m.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    theirs = hf_logits(tmp_path / "hf", tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max abs logit diff kiln vs transformers = {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("case", ["gqa", "tied"])
def test_hf_kiln_hf_roundtrip_is_bit_identical(tmp_path, case):
    model, cfg = make_model(**CASES[case])
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "hf", tmp_path / "hf1")
    summary = convert(tmp_path / "hf1", "kiln", tmp_path / "imported")
    assert summary["source_format"] == "hf"
    convert(tmp_path / "imported", "hf", tmp_path / "hf2")
    a, b = read_safetensors(tmp_path / "hf1"), read_safetensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "hf1/config.json").read_text()) == json.loads((tmp_path / "hf2/config.json").read_text())

    # The imported checkpoint is the original model: same tensors under kiln names ...
    reader = KilnCheckpointReader(tmp_path / "imported")
    for name, t in model.state_dict().items():
        assert torch.equal(reader.get(name), t), name
    # ... and it loads through the training code's own checkpoint loader, then trains.
    from kiln.checkpoint.manager import CheckpointManager

    fresh = Transformer(dataclasses.replace(reader.cfg.model, attention="math"))
    CheckpointManager(tmp_path / "imported").load_weights(reader.step_dir, [fresh], expect_hash=None)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), model(tokens))
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = fresh.train()(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tokenizer_files_are_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    data = tmp_path / "data"
    data.mkdir()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"]))
    tok.save(str(data / "tokenizer.json"))
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"name": "bpe", "eos_id": 0}}))
    model, cfg = make_model(**CASES["tied"])
    cfg.data.path = str(data)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "hf", tmp_path / "hf")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert loaded("hello world")["input_ids"] == tok.encode("hello world").ids
    assert loaded.eos_token == "<|eos|>" and loaded.eos_token_id == 0
    assert json.loads((tmp_path / "hf/generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((tmp_path / "hf/config.json").read_text())["eos_token_id"] == 0


def test_mismatches_name_the_culprit(tmp_path):
    model, cfg = make_model(**CASES["gqa"])
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "hf", tmp_path / "hf")
    config_path = tmp_path / "hf/config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, vocab_size=1024)))
    with pytest.raises(KilnError, match="model.embed_tokens.weight"):
        convert(tmp_path / "hf", "kiln", tmp_path / "bad")
    config_path.write_text(json.dumps(dict(config, rope_parameters={"rope_type": "longrope", "rope_theta": 1.0})))
    with pytest.raises(KilnError, match="rope_type"):
        convert(tmp_path / "hf", "kiln", tmp_path / "bad2")
    with pytest.raises(KilnError, match="not empty"):
        convert(tmp_path / "run", "hf", tmp_path / "hf")
    with pytest.raises(KilnError, match="no such file"):
        convert(tmp_path / "nope", "hf", tmp_path / "x")
