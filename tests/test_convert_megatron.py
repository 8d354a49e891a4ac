"""kiln <-> Megatron-Core GPT. Oracle: megatron-core itself. Each rank builds a `GPTModel`
(local layer spec) on CPU from the matching TransformerConfig, loads its converted file with
`strict=True`, and runs its own decoder (RoPE, fused QKV, SwiGLU, vocab-parallel output) on
the same tokens as kiln; logits must agree. Then Megatron -> kiln must give back the exact
tensors. Megatron's forward pins three things to CUDA (RoPE table, a scratch buffer and the
dropout RNG tracker) and a tied PP model syncs its embedding copies through CUDA at
construction; the workers route around those on CPU, changing no arithmetic."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kiln.convert.convert import convert
from kiln.checkpoint.kiln_format import KilnCheckpointReader, write_kiln_checkpoint
from kiln.convert.megatron import rank_dir_name
from kiln.config import Config, ModelConfig
from kiln.distributed import shutdown
from kiln.errors import KilnError
from kiln.model.llama import Transformer

pytest.importorskip("megatron.core")
SEQ = 12
LONG, LONG_POSITIONS = 131072, [0, 1, 1000, 8191, 8192, 50000, 131071]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(vocab=512, n_heads=4, n_kv_heads=2, tie=False, **extra) -> tuple[Transformer, Config]:
    m = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    max_seq_len=64, tie_embeddings=tie, norm_eps=1e-6, attention="math",
                    init_std=0.1, **{"rope_theta": 5000.0, **extra})
    cfg = Config(model=m)
    cfg.data.seq_len = 32
    torch.manual_seed(0)
    model = Transformer(m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


def _worker(rank: int, world: int, port: int, tp: int, pp: int, m: ModelConfig, padded_vocab: int, ckpt: str,
            tokens: torch.Tensor, out: str, fmt: str = "torch") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist
    import torch.nn.functional as F

    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {"rank": rank}
    try:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        from megatron.core.models.common.language_module.language_module import LanguageModule

        parallel_state.initialize_model_parallel(tp, pp)
        # A tied model under PP syncs its two embedding copies at construction through .cuda();
        # the weights come from the checkpoint anyway, so skip that initial sync on CPU.
        LanguageModule._is_in_embd_group = lambda self: False
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        meta = json.loads((Path(ckpt) / "megatron_config.json").read_text())
        config = TransformerConfig(
            kv_channels=meta["kv_channels"], num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads,
            num_query_groups=m.kv_heads, ffn_hidden_size=m.ffn_hidden, normalization="RMSNorm",
            layernorm_epsilon=m.norm_eps, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
            attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
        model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded_vocab,
                         max_sequence_length=m.max_seq_len, position_embedding_type="rope", rotary_base=int(m.rope_theta),
                         rope_scaling=meta["rope_scaling"], rope_scaling_factor=meta["rope_scaling_factor"],
                         seq_len_interpolation_factor=meta["seq_len_interpolation_factor"],
                         share_embeddings_and_output_weights=m.tie_embeddings,
                         pre_process=pp_rank == 0, post_process=pp_rank == pp - 1).eval()
        if fmt == "torch_dist":  # megatron-core's own loader, resharding the global tensors to this rank
            from megatron.core import dist_checkpointing

            # _extra_state objects (None in the local spec) are left out: megatron-core 0.16.1's load of
            # ShardedObjects returns raw BytesIO under torch 2.13 and then fails on its own bookkeeping.
            sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
            loaded = dist_checkpointing.load(sharded, str(Path(ckpt) / "release"))
            assert loaded["kiln_megatron"]["kv_channels"] == meta["kv_channels"]  # common.pt merged in, as for Megatron-LM
            state = {k: v for k, v in loaded.items() if k in sharded}
            state.update({k: None for k in model.state_dict() if k.endswith("_extra_state")})
            result["loaded"] = "release (torch_dist)"
        else:
            path = Path(ckpt) / "release" / rank_dir_name(tp_rank, pp_rank, pp) / "model_optim_rng.pt"
            state = torch.load(path, weights_only=True)["model"]
            result["loaded"] = str(path.relative_to(ckpt))
        model.load_state_dict(state, strict=True)
        if pp_rank == 0:  # Megatron's RoPE angles at long range (positions only, no forward)
            result["angles"] = model.rotary_pos_emb.get_freqs_non_repeated(LONG)[LONG_POSITIONS].tolist()
        result["equal"] = all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if v is not None)
        if pp == 1:
            class _NoFork:
                def fork(self, *args, **kwargs):
                    return contextlib.nullcontext()

            tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
            parallel_state.get_global_memory_buffer().buffer[("mpu", torch.float32)] = torch.empty(1 << 20)
            with torch.no_grad():
                hidden = model.embedding(input_ids=tokens, position_ids=torch.arange(SEQ)[None].expand(len(tokens), -1))
                freqs = model.rotary_pos_emb.get_freqs_non_repeated(SEQ)
                rope = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
                mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
                hidden = model.decoder(hidden, attention_mask=mask, rotary_pos_emb=rope)
                weight = model.shared_embedding_or_output_weight() if m.tie_embeddings else None
                logits, _ = model.output_layer(hidden, weight=weight)
            result["logits"] = logits.transpose(0, 1).tolist()  # [b, s, vocab / tp]
            result["vocab_slice"] = [tp_rank * padded_vocab // tp, (tp_rank + 1) * padded_vocab // tp]
    except Exception as exc:  # report to the parent instead of hanging the group
        import traceback
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown()  # barrier, destroy, flush, os._exit: the gloo exit-abort cure


def run_megatron(tmp: Path, ckpt: Path, cfg: Config, tp: int, pp: int, tokens: torch.Tensor,
                 fmt: str = "torch") -> list[dict]:
    out = tmp / f"results_tp{tp}_pp{pp}"
    out.mkdir()
    meta = json.loads((ckpt / "megatron_config.json").read_text())
    mp.start_processes(_worker, args=(tp * pp, _free_port(), tp, pp, cfg.model, meta["padded_vocab_size"], str(ckpt),
                                      tokens, str(out), fmt), nprocs=tp * pp, start_method="spawn", join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp * pp)]
    for r in results:
        assert "error" not in r, r["error"]
        assert r["equal"]
    return results


def check_logits(model: Transformer, tokens: torch.Tensor, results: list[dict], label: str) -> float:
    with torch.no_grad():
        ours = model(tokens)
    worst = 0.0
    for r in results:
        lo, hi = r["vocab_slice"]
        theirs = torch.tensor(r["logits"])
        hi_real = min(hi, ours.shape[-1])
        worst = max(worst, (ours[..., lo:hi_real] - theirs[..., : hi_real - lo]).abs().max().item())
    print(f"{label}: max abs logit diff kiln vs megatron-core = {worst:.3g}")
    return worst


def assert_same_as(model: Transformer, kiln_dir: Path) -> None:
    reader = KilnCheckpointReader(kiln_dir)
    assert reader.cfg.model.vocab_size == model.cfg.vocab_size
    for name, t in model.state_dict().items():
        assert torch.equal(reader.get(name), t), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["gqa", "tied_padded_vocab"])
def test_megatron_tp1_logits_and_roundtrip(tmp_path, case):
    model, cfg = make_model(tie=True, vocab=500, n_kv_heads=None) if case != "gqa" else make_model()
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mcore")
    assert (tmp_path / "mcore/latest_checkpointed_iteration.txt").read_text() == "release"
    tokens = torch.randint(0, cfg.model.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    results = run_megatron(tmp_path, tmp_path / "mcore", cfg, 1, 1, tokens)
    assert check_logits(model, tokens, results, f"tp1 {case}") <= 1e-5
    summary = convert(tmp_path / "mcore", "kiln", tmp_path / "back")
    assert summary["source_format"] == "megatron"
    assert_same_as(model, tmp_path / "back")


@pytest.mark.timeout(300)
def test_megatron_tp2_each_rank_loads_its_split(tmp_path):
    model, cfg = make_model(n_heads=4, n_kv_heads=2)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mcore", tp=2)
    assert sorted(p.name for p in (tmp_path / "mcore/release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    tokens = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(4))
    results = run_megatron(tmp_path, tmp_path / "mcore", cfg, 2, 1, tokens)
    assert check_logits(model, tokens, results, "tp2 gqa") <= 1e-5
    convert(tmp_path / "mcore", "kiln", tmp_path / "back")
    assert_same_as(model, tmp_path / "back")


@pytest.mark.timeout(300)
def test_megatron_pp2_tied_loads_per_stage_and_roundtrips(tmp_path):
    model, cfg = make_model(tie=True)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mcore", pp=2)
    names = sorted(p.name for p in (tmp_path / "mcore/release").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_00_001"]
    last = torch.load(tmp_path / "mcore/release/mp_rank_00_001/model_optim_rng.pt", weights_only=True)["model"]
    assert "decoder.layers.0.input_layernorm.weight" in last and "decoder.layers.1.input_layernorm.weight" not in last
    assert torch.equal(last["output_layer.weight"], model.tok_embeddings.weight)
    run_megatron(tmp_path, tmp_path / "mcore", cfg, 1, 2, torch.zeros(1, SEQ, dtype=torch.long))
    convert(tmp_path / "mcore", "kiln", tmp_path / "back")
    assert_same_as(model, tmp_path / "back")


def test_megatron_errors_name_the_tensor(tmp_path):
    model, cfg = make_model()
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    with pytest.raises(KilnError, match="--tp 3"):
        convert(tmp_path / "run", "megatron", tmp_path / "bad", tp=3)
    convert(tmp_path / "run", "megatron", tmp_path / "mcore")
    path = tmp_path / "mcore/release/mp_rank_00/model_optim_rng.pt"
    blob = torch.load(path, weights_only=True)
    blob["model"]["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(128)
    torch.save(blob, path)
    with pytest.raises(KilnError, match="linear_qkv.bias"):
        convert(tmp_path / "mcore", "kiln", tmp_path / "back")
    del blob["model"]["decoder.layers.0.self_attention.linear_qkv.bias"]
    blob["model"]["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 100)
    torch.save(blob, path)
    with pytest.raises(KilnError, match="layers.1.feed_forward.w2.weight"):
        convert(tmp_path / "mcore", "kiln", tmp_path / "back2")
    blob["evil"] = contextlib.nullcontext  # a pickled callable must not be loaded
    torch.save(blob, path)
    with pytest.raises(KilnError, match="weights_only"):
        convert(tmp_path / "mcore", "kiln", tmp_path / "back3")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["llama3_head_dim_tp2", "linear_tp1"])
def test_megatron_rope_scaling_and_head_dim(tmp_path, case):
    """llama3 RoPE scaling (Megatron-Core's rope_scaling), linear (its seq_len_interpolation_factor)
    and head_dim != hidden/heads (kv_channels): megatron-core's logits and its RoPE angles up to
    position 131071 against kiln's table; Megatron -> kiln keeps every setting."""
    from kiln.config import RopeScalingConfig
    from kiln.model.llama import rope_cache

    tp = 2 if case.endswith("tp2") else 1
    scaling = RopeScalingConfig(type="llama3", factor=8.0) if case.startswith("llama3") else \
        RopeScalingConfig(type="linear", factor=4.0)
    extra = dict(head_dim=24, rope_theta=500000.0) if case.startswith("llama3") else {}
    model, cfg = make_model(rope_scaling=scaling, **extra)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mcore", tp=tp)
    tokens = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(5))
    results = run_megatron(tmp_path, tmp_path / "mcore", cfg, tp, 1, tokens)
    assert check_logits(model, tokens, results, case) <= 1e-5
    angles = torch.tensor(results[0]["angles"])
    table = rope_cache(angles.shape[-1] * 2, LONG, cfg.model.rope_theta, scaling)[LONG_POSITIONS]
    assert (table[..., 0] - angles.cos()).abs().max() <= 1e-5 and (table[..., 1] - angles.sin()).abs().max() <= 1e-5
    convert(tmp_path / "mcore", "kiln", tmp_path / "back")
    back = KilnCheckpointReader(tmp_path / "back").cfg.model
    assert back.rope_scaling == scaling and back.head_dim == cfg.model.head_dim
    assert_same_as(model, tmp_path / "back")


@pytest.mark.parametrize("extra,culprit", [(dict(qkv_bias=True), "model.qkv_bias"),
                                           (dict(attention_window=8), "model.attention_window"),
                                           (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn")])
def test_megatron_refuses_what_it_cannot_hold(tmp_path, extra, culprit):
    from kiln.config import RopeScalingConfig

    if "rope_scaling" in extra:
        extra = dict(rope_scaling=RopeScalingConfig(**extra["rope_scaling"]))
    model, cfg = make_model(**extra)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    with pytest.raises(KilnError, match=culprit):
        convert(tmp_path / "run", "megatron", tmp_path / "mcore")


def _megatron_lm_args(m: ModelConfig, padded_vocab: int, **changes):
    """`args` as Megatron-LM's arguments.py leaves them after validation (the fields that shape the
    model), with a real AttnBackend enum member and a torch dtype, as its checkpoints hold."""
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    fields = dict(num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads,
                  group_query_attention=m.n_kv_heads is not None, num_query_groups=m.n_kv_heads or 1,
                  kv_channels=m.d_model // m.n_heads, ffn_hidden_size=m.ffn_hidden, normalization="RMSNorm",
                  norm_epsilon=m.norm_eps, swiglu=True, add_bias_linear=False, add_qkv_bias=False,
                  position_embedding_type="rope", rotary_base=int(m.rope_theta), rotary_percent=1.0,
                  rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
                  untie_embeddings_and_output_weights=not m.tie_embeddings, padded_vocab_size=padded_vocab,
                  vocab_size=m.vocab_size, max_position_embeddings=m.max_seq_len, seq_length=32,
                  init_method_std=m.init_std, attention_backend=AttnBackend.auto, params_dtype=torch.bfloat16,
                  qk_layernorm=False, num_experts=None, multi_latent_attention=False, window_size=None,
                  apply_layernorm_1p=False, layernorm_zero_centered_gamma=False, ckpt_format="torch")
    fields.update(changes)
    return argparse.Namespace(**fields)


def _as_megatron_lm(tmp_path: Path, model, cfg, **arg_changes) -> Path:
    """A kiln-written Megatron checkpoint rewritten the way Megatron-LM saves one: no kiln metadata or
    sidecar, `args`, numpy/python/torch RNG states, optimizer and scheduler state."""
    import random

    import numpy as np

    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mlm")
    padded = json.loads((tmp_path / "mlm/megatron_config.json").read_text())["padded_vocab_size"]
    (tmp_path / "mlm/megatron_config.json").unlink()
    path = tmp_path / "mlm/release/mp_rank_00/model_optim_rng.pt"
    blob = torch.load(path, weights_only=True)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}]
    torch.save({"args": _megatron_lm_args(cfg.model, padded, **arg_changes), "checkpoint_version": 3.0,
                "iteration": 100, "model": blob["model"], "rng_state": rng,
                "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
                "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 100}}, path)
    return tmp_path / "mlm"


def test_megatron_lm_legacy_file_reads_safely_and_honours_args(tmp_path):
    from kiln.config import RopeScalingConfig

    model, cfg = make_model(vocab=500, rope_scaling=RopeScalingConfig(type="llama3", factor=8.0))
    src = _as_megatron_lm(tmp_path, model, cfg, use_rope_scaling=True, rope_scaling_factor=8.0)
    convert(src, "kiln", tmp_path / "back")
    back = KilnCheckpointReader(tmp_path / "back").cfg.model
    assert back.vocab_size == 500  # args.vocab_size, not the padded 512: padding rows dropped
    assert back.rope_scaling == cfg.model.rope_scaling and back.n_kv_heads == 2 and not back.tie_embeddings
    assert_same_as(model, tmp_path / "back")


@pytest.mark.parametrize("change,culprit", [(dict(rotary_percent=0.5), "args.rotary_percent=0.5"),
                                            (dict(swiglu=False), "args.swiglu=False"),
                                            (dict(normalization="LayerNorm"), "args.normalization"),
                                            (dict(add_qkv_bias=True), "args.add_qkv_bias")])
def test_megatron_lm_args_that_change_the_math_are_refused(tmp_path, change, culprit):
    model, cfg = make_model()
    src = _as_megatron_lm(tmp_path, model, cfg, **change)
    with pytest.raises(KilnError, match=culprit):
        convert(src, "kiln", tmp_path / "back")


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_megatron_planted_pickle_in_rng_state_never_runs(tmp_path):
    model, cfg = make_model()
    src = _as_megatron_lm(tmp_path, model, cfg)
    path = src / "release/mp_rank_00/model_optim_rng.pt"
    from kiln.convert.megatron import safe_globals

    with torch.serialization.safe_globals(safe_globals()):
        blob = torch.load(path, weights_only=True)
    blob["rng_state"][0]["np_rng_state"] = _Planted(tmp_path / "pwned")
    torch.save(blob, path)
    with pytest.raises(KilnError, match="model_optim_rng.pt"):
        convert(src, "kiln", tmp_path / "back")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "pp2_tied"])
def test_megatron_torch_dist_loads_in_megatron_core_and_roundtrips(tmp_path, layout):
    """`--megatron-format torch_dist`: megatron-core's `dist_checkpointing.load` reshards it onto a
    TP=2 or PP=2 GPTModel, which then loads it with strict=True (and, under TP, gives kiln's logits);
    torch_dist -> kiln gives back the exact tensors and settings."""
    from kiln.config import RopeScalingConfig

    tp, pp = (2, 1) if layout == "tp2" else (1, 2)
    if layout == "tp2":
        model, cfg = make_model(vocab=500, head_dim=24, rope_theta=500000.0,
                                rope_scaling=RopeScalingConfig(type="llama3", factor=8.0))
    else:
        model, cfg = make_model(tie=True)
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    summary = convert(tmp_path / "run", "megatron", tmp_path / "mdist", tp=tp, pp=pp, megatron_format="torch_dist")
    assert "release/.metadata" in summary["files"] and "release/common.pt" in summary["files"]
    assert json.loads((tmp_path / "mdist/release/metadata.json").read_text())["sharded_backend"] == "torch_dist"
    tokens = torch.randint(0, 500, (2, SEQ), generator=torch.Generator().manual_seed(6))
    results = run_megatron(tmp_path, tmp_path / "mdist", cfg, tp, pp, tokens, fmt="torch_dist")
    if pp == 1:
        assert check_logits(model, tokens, results, f"torch_dist {layout}") <= 1e-5
    back = convert(tmp_path / "mdist", "kiln", tmp_path / "back")
    assert back["source_format"] == "megatron"
    assert KilnCheckpointReader(tmp_path / "back").cfg.model.rope_scaling == cfg.model.rope_scaling
    assert_same_as(model, tmp_path / "back")


def test_megatron_torch_dist_other_backends_are_refused(tmp_path):
    model, cfg = make_model()
    write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run")
    convert(tmp_path / "run", "megatron", tmp_path / "mdist", megatron_format="torch_dist")
    (tmp_path / "mdist/release/metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(KilnError, match="zarr"):
        convert(tmp_path / "mdist", "kiln", tmp_path / "back")
