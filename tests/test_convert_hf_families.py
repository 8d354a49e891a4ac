"""Real checkpoint families through kiln: Llama 3.x (llama3 RoPE scaling), Llama's bias and head_dim
options, Mistral (sliding window, explicit head_dim), Qwen2 (q/k/v biases, tied), Mixtral (MoE in
every layer) and linear/YaRN RoPE scaling. Oracle: transformers' own modeling code. A tiny random-weight model of each family
(its architecture fields copied from the real model's config.json, cited below) is imported, must
give transformers' logits at length 64 and 1024, and exports back to a checkpoint transformers
loads as the same class with every math-changing config field intact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.convert.convert import convert
from kiln.checkpoint.kiln_format import KilnCheckpointReader
from kiln.errors import KilnError
from kiln.model.llama import Transformer, rope_cache

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=160)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
CASES = {
    # meta-llama/Llama-3.2-1B config.json: rope_scaling {factor 32, low_freq_factor 1, high_freq_factor 4,
    # original_max_position_embeddings 8192, rope_type llama3}, rope_theta 500000, max_position_embeddings
    # 131072, heads 32 / kv 8, rms_norm_eps 1e-5, tie_word_embeddings true. Tiny: 4 heads / 1 kv head.
    "llama3.2": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                                     max_position_embeddings=131072, tie_word_embeddings=True,
                                     rope_parameters=LLAMA3_ROPE)),
    # meta-llama/Llama-3.1-8B: the same rope_scaling with factor 8, untied, heads 32 / kv 8.
    "llama3.1": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                     max_position_embeddings=131072, tie_word_embeddings=False,
                                     rope_parameters=dict(LLAMA3_ROPE, factor=8.0))),
    # LlamaConfig's own options (no released model uses all three): attention_bias (q,k,v,o), mlp_bias,
    # and head_dim 32 != hidden_size / heads = 16; linear RoPE scaling (factor 4, as in CodeLlama-style
    # context extension).
    "llama_bias_head_dim": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6,
                                                max_position_embeddings=4096,
                                                rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                 "rope_theta": 10000.0})),
    # mistralai/Mistral-7B-v0.1: sliding_window 4096, rope_theta 10000, heads 32 / kv 8, rms 1e-5, untied;
    # mistralai/Mistral-Nemo-Base-2407: head_dim 128 != 5120 / 32. Tiny: window 32, head_dim 24 != 16.
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=32,
                                      rms_norm_eps=1e-5, max_position_embeddings=32768,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Qwen/Qwen2-0.5B: q/k/v biases (no o bias), tie_word_embeddings true, rope_theta 1e6, rms 1e-6,
    # heads 14 / kv 2, use_sliding_window false, max_window_layers 24.
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, use_sliding_window=False, max_window_layers=2,
                                  max_position_embeddings=32768,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen/Qwen2.5-7B-Instruct model card (long texts): rope_scaling {factor 4.0,
    # original_max_position_embeddings 32768, type yarn}; untied.
    "qwen2_yarn": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                       tie_word_embeddings=False, max_position_embeddings=131072,
                                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000000.0,
                                                        "original_max_position_embeddings": 32768})),
    # mistralai/Mixtral-8x7B-v0.1 config.json: num_local_experts 8, num_experts_per_tok 2, rope_theta 1e6,
    # heads 32 / kv 8, rms 1e-5, sliding_window null, router_aux_loss_coef 0.02. Tiny: 4 experts, top 2.
    "mixtral": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None,
                                      router_aux_loss_coef=0.02, max_position_embeddings=32768,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
# config.json keys that do not change the model's function (everything else must survive a round trip)
NOT_MATH = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "bos_token_id",
            "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "output_attentions",
            "output_hidden_states", "return_dict", "pretraining_tp", "attention_dropout", "layer_types"}


def make_hf(case: str, path: Path):
    """A random-weight transformers model of the family, saved as safetensors; biases and norms random."""
    cls_name, fields = CASES[case]
    config = getattr(transformers, cls_name)(**TINY, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def kiln_model(kiln_dir: Path, attention: str = "sdpa") -> Transformer:
    reader = KilnCheckpointReader(kiln_dir)
    m = reader.cfg.model
    m.attention = attention
    model = Transformer(m).eval()
    model.load_state_dict({n: reader.get(n) for n in model.state_dict()})
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_import_logits_and_export(tmp_path, case):
    hf = make_hf(case, tmp_path / "hf")
    convert(tmp_path / "hf", "kiln", tmp_path / "kiln")
    model = kiln_model(tmp_path / "kiln")
    worst = {}
    for seq in (64, 1024):
        tokens = torch.randint(0, 512, (1, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            worst[seq] = max_diff(model(tokens), hf(tokens).logits)
    print(f"{case}: max abs logit diff kiln vs transformers: len 64 {worst[64]:.3g}, len 1024 {worst[1024]:.3g}")
    assert worst[64] <= 1e-5 and worst[1024] <= 1e-5, worst

    convert(tmp_path / "kiln", "hf", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(back) is type(hf)
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    a, b = (transformers.AutoConfig.from_pretrained(str(tmp_path / d)).to_dict() for d in ("hf", "out"))
    for c in (a, b):  # an absent head_dim means hidden_size / heads
        c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        if c.get("use_sliding_window") is False:  # Qwen2's window fields only count when it is on
            c.pop("max_window_layers", None), c.pop("sliding_window", None)
    for key in sorted((a.keys() | b.keys()) - NOT_MATH):
        assert a.get(key) == b.get(key), f"config field {key}: {a.get(key)!r} became {b.get(key)!r}"


@pytest.mark.parametrize("case", ["llama3.2", "llama_bias_head_dim", "qwen2_yarn"])
def test_rope_table_matches_transformers_at_long_range(case):
    """kiln's cos/sin table against transformers' rotary embedding at positions up to 131071: a
    wrong scaling formula shows up here without running long sequences."""
    cls_name, fields = CASES[case]
    config = getattr(transformers, cls_name)(**TINY, **fields)
    from kiln.convert.hf import kiln_config_from_hf

    m = kiln_config_from_hf(config.to_dict(), "config.json", case).model
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = transformers.AutoModelForCausalLM.from_config(config).model.rotary_emb
    positions = torch.tensor([[0, 1, 100, 2047, 4095, 8191, 8192, 20000, 32767, 65535, 100000, 131071]])
    cos, sin = rotary(torch.zeros(1, 1, hd), positions)
    table = rope_cache(hd, 131072, m.rope_theta, m.rope_scaling)[positions[0]]
    assert max_diff(table[..., 0], cos[0, :, : hd // 2]) <= 1e-6
    assert max_diff(table[..., 1], sin[0, :, : hd // 2]) <= 1e-6
    # and the scaling matters at these positions: the unscaled table is far off
    plain = rope_cache(hd, 131072, m.rope_theta)[positions[0]]
    assert max_diff(plain[..., 0], cos[0, :, : hd // 2]) > 0.1


def _config(tmp_path: Path, case: str) -> tuple[Path, dict]:
    make_hf(case, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("edit,culprit", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "max_window_layers"),
    ({"model_type": "gemma"}, "model_type"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, edit, culprit):
    path, config = _config(tmp_path, "qwen2")
    config.update(edit)
    path.write_text(json.dumps(config))
    with pytest.raises(KilnError, match=culprit.replace(".", r"\.")):
        convert(tmp_path / "hf", "kiln", tmp_path / "bad")


def test_transformers4_rope_scaling_key_is_read(tmp_path):
    """A transformers 4 config.json (rope_theta + rope_scaling, no rope_parameters) imports the same."""
    path, config = _config(tmp_path, "llama3.1")
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config))
    convert(tmp_path / "hf", "kiln", tmp_path / "kiln")
    r = KilnCheckpointReader(tmp_path / "kiln").cfg.model
    assert r.rope_theta == 500000.0 and r.rope_scaling.type == "llama3" and r.rope_scaling.factor == 8.0


def test_special_tokens_and_generation_config_survive_import_export_and_eos_stops_greedy(tmp_path):
    """bos/eos/pad and generation_config.json travel HF -> kiln -> HF; transformers' greedy decoding of
    the exported model stops at the carried EOS. The EOS id is a token the model really produces
    (the 6th greedy token), so stopping there proves the id arrived, not a degenerate model."""
    hf = make_hf("llama3.1", tmp_path / "hf")
    prompt = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        free = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:]
    first = {}
    for i, t in enumerate(free.tolist()):
        first.setdefault(t, i)
    eos, stop = next((t, i) for t, i in sorted(first.items(), key=lambda kv: kv[1]) if i >= 3)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps(dict(config, bos_token_id=1, eos_token_id=eos, pad_token_id=2)))
    gen = {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 2, "do_sample": False, "max_new_tokens": 24}
    (tmp_path / "hf/generation_config.json").write_text(json.dumps(gen))

    convert(tmp_path / "hf", "kiln", tmp_path / "kiln")
    convert(tmp_path / "kiln", "hf", tmp_path / "out", dtype="bf16")
    out = json.loads((tmp_path / "out/config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (1, eos, 2)
    assert out["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out/generation_config.json").read_text()) == gen
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert all(p.dtype == torch.bfloat16 for p in transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out")).parameters())
    with torch.no_grad():
        tokens = back.generate(prompt)[0, 4:].tolist()
    assert tokens[-1] == eos and len(tokens) == stop + 1, (tokens, eos, stop)

    # a run fine-tuned from the import (checkpoint.init_from) exports the same tokens
    from kiln.checkpoint.kiln_format import write_kiln_checkpoint

    reader = KilnCheckpointReader(tmp_path / "kiln")
    cfg = reader.cfg
    cfg.checkpoint.init_from = str(tmp_path / "kiln")
    write_kiln_checkpoint({n: reader.get(n) for n in reader.names()}, cfg, tmp_path / "tuned", step=5)
    convert(tmp_path / "tuned", "hf", tmp_path / "out2")
    assert json.loads((tmp_path / "out2/config.json").read_text())["eos_token_id"] == eos


# One launch per family (each costs ~30 s of process start-up on 2 shared cores); every option under
# both TP=2 and FSDP=2 is checked against the single process in test_parallel_families.py.
TRAIN = {"llama_bias_head_dim": ["parallel.tp=2", "parallel.dp_shard=1"],
         "mistral": ["parallel.tp=2", "parallel.dp_shard=1"],
         "qwen2": ["parallel.dp_shard=2"]}  # tied embeddings: FSDP (kiln's TP needs them untied)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(TRAIN))
def test_import_train_parallel_export_matches_transformers(tmp_path, case):
    """The whole path: HF import, `kiln launch` of 2 gloo workers under TP=2 or FSDP=2 starting from the
    import, export of the trained run; transformers' logits of the export equal kiln's of the run."""
    import os
    import sys

    from conftest import run_group

    hf = make_hf(case, tmp_path / "hf")
    convert(tmp_path / "hf", "kiln", tmp_path / "imported")
    overrides = ["data.synthetic=markov", "data.seq_len=32", "train.micro_batch=2", "train.steps=3",
                 "train.eval_every=0", "optim.warmup_steps=0", "logging.tensorboard=false", "logging.progress=false",
                 f"checkpoint.init_from={tmp_path / 'imported'}", f"train.run_dir={tmp_path}", "train.name=tuned",
                 *TRAIN[case]]
    proc = run_group([sys.executable, "-m", "kiln.cli", "launch", "--nproc", "2",
                      str(tmp_path / "imported" / "config.yaml"), *overrides],
                     timeout=500, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    convert(tmp_path / "tuned", "hf", tmp_path / "out")
    trained = kiln_model(tmp_path / "tuned")
    moved = max_diff(trained.layers["0"].attention.wq.weight, kiln_model(tmp_path / "imported").layers["0"].attention.wq.weight)
    assert moved > 1e-4, "training changed the imported weights"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(back) is type(hf)
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = max_diff(trained(tokens), back(tokens).logits)
    print(f"{case} after {' '.join(TRAIN[case])}: max abs logit diff kiln vs transformers {diff:.3g}")
    assert diff <= 1e-5
