"""Megatron-Core GPT (local layer spec, legacy `torch` checkpoint format) <-> kiln.

Layout: `OUT/latest_checkpointed_iteration.txt` says "release"; `OUT/release/mp_rank_TT[_PPP]/
model_optim_rng.pt` holds {"model": state_dict, ...} for tensor rank TT and pipeline rank PPP
(the suffix only when pp > 1). Names follow `get_gpt_layer_local_spec()`:

- `linear_qkv` fuses q, k, v per query group: [q heads of group g..., k_g, v_g] for each g;
  tensor parallelism splits it by rows (whole groups per rank).
- `linear_fc1` is [gate; up]; each TP rank holds [gate slice; up slice].
- `linear_proj`, `linear_fc2` split by columns; embedding and output split the (padded) vocab.
- Pipeline stages number their layers from 0; the last stage of a tied model keeps its own
  copy of the output weight, as Megatron does.

Megatron-Core's default RoPE (`rotary_interleaved=False`) rotates halves, like Hugging Face,
so q/k rows are permuted from kiln's interleaved pairs. Files are read with
`torch.load(weights_only=True, mmap=True)`: nothing but tensors and plain data is unpickled,
and tensors are paged in only when used.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from kiln.convert.names import (validate_model, Source, cast, check_shape, half_to_interleaved,
                                    interleaved_to_half, kiln_shapes)
from kiln.config import Config, ConfigError, ModelConfig, RopeScalingConfig
from kiln.errors import KilnError

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
META_KEY = "kiln_megatron"
SIDECAR = "megatron_config.json"
DIST_METADATA = "metadata.json"  # a dist_checkpointing (torch_dist) directory
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_KNOWN = re.compile(r"^(embedding\.word_embeddings\.weight|decoder\.final_layernorm\.weight|output_layer\.weight"
                    r"|decoder\.layers\.\d+\.(input_layernorm\.weight|pre_mlp_layernorm\.weight"
                    r"|self_attention\.linear_qkv\.(weight|layer_norm_weight)|self_attention\.linear_proj\.weight"
                    r"|mlp\.linear_fc1\.(weight|layer_norm_weight)|mlp\.linear_fc2\.weight)"
                    r"|.*\._extra_state)$")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def padded_vocab(vocab: int, tp: int, multiple: int) -> int:
    step = max(1, multiple) * tp
    return math.ceil(vocab / step) * step


# Megatron-Core's llama3 RoPE scaling takes only the factor; the rest is fixed at Llama 3.1's values.
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def megatron_rope(m: ModelConfig) -> dict[str, Any]:
    """GPTModel's RoPE-scaling arguments for kiln's rope_scaling, or a one-line refusal."""
    r = m.rope_scaling
    if r is None:
        return {"rope_scaling": False, "rope_scaling_factor": 8.0, "seq_len_interpolation_factor": None}
    if r.type == "linear":  # Megatron divides positions by the factor: the same angles
        return {"rope_scaling": False, "rope_scaling_factor": 8.0, "seq_len_interpolation_factor": r.factor}
    if r.type == "llama3" and all(getattr(r, k) == v for k, v in _MCORE_LLAMA3.items()):
        return {"rope_scaling": True, "rope_scaling_factor": r.factor, "seq_len_interpolation_factor": None}
    raise KilnError(f"model.rope_scaling: {r.type} RoPE scaling with these parameters has no Megatron-Core GPTModel "
                    f"equivalent (it supports llama3 with {_MCORE_LLAMA3} and linear)")


def _refuse_unsupported(m: ModelConfig) -> None:
    for key in ("attention_bias", "qkv_bias", "mlp_bias"):
        if getattr(m, key):
            raise KilnError(f"model.{key}: biases are not supported by kiln's Megatron converter")
    if m.attention_window is not None:
        raise KilnError("model.attention_window: sliding-window attention is not supported by kiln's Megatron converter")


def megatron_meta(m: ModelConfig, tp: int, pp: int, vocab_multiple: int) -> dict[str, Any]:
    """Everything needed to build the matching TransformerConfig and GPTModel (plain data)."""
    return {**megatron_rope(m),
        "num_layers": m.n_layers, "hidden_size": m.d_model, "num_attention_heads": m.n_heads,
        "num_query_groups": m.kv_heads, "kv_channels": m.dim_per_head,
        "ffn_hidden_size": kiln_shapes(m)["layers.0.feed_forward.w1.weight"][0],
        "normalization": "RMSNorm", "layernorm_epsilon": m.norm_eps, "gated_linear_unit": True,
        "activation_func": "silu", "add_bias_linear": False, "position_embedding_type": "rope",
        "rotary_base": m.rope_theta, "rotary_interleaved": False, "rotary_percent": 1.0,
        "vocab_size": m.vocab_size, "padded_vocab_size": padded_vocab(m.vocab_size, tp, vocab_multiple),
        "max_sequence_length": m.max_seq_len, "share_embeddings_and_output_weights": m.tie_embeddings,
        "init_method_std": m.init_std, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
    }


# ---------------------------------------------------------------- writing


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, hd = m.kv_heads, m.dim_per_head
    q = interleaved_to_half(q, m.n_heads).reshape(groups, -1, q.shape[1])
    k = interleaved_to_half(k, groups).reshape(groups, hd, k.shape[1])
    return torch.cat([q, k, v.reshape(groups, hd, v.shape[1])], dim=1).reshape(-1, q.shape[-1])


def write_megatron(source: Source, out: Path, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                   vocab_multiple: int = 128) -> list[str]:
    """Write a TP x PP Megatron-Core checkpoint; one pipeline stage is in memory at a time."""
    m = source.cfg.model
    check_writable(m, tp, pp)
    meta = megatron_meta(m, tp, pp, vocab_multiple)
    vocab = meta["padded_vocab_size"]
    per_stage = m.n_layers // pp
    root = out / "release"
    files = []

    def get(name: str) -> torch.Tensor:
        return cast(source.get(name), dtype)

    shapes = kiln_shapes(m)
    for stage in range(pp):
        ranks: list[dict[str, Any]] = [{} for _ in range(tp)]

        def put(key: str, t: torch.Tensor, dim: Optional[int]) -> None:
            parts = [t] * tp if dim is None else list(torch.chunk(t, tp, dim=dim))
            for r in range(tp):
                ranks[r][key] = parts[r].clone()

        def extra(key: str) -> None:
            for r in range(tp):
                ranks[r][key + "._extra_state"] = None

        if stage == 0:
            emb = check_shape("tok_embeddings.weight", get("tok_embeddings.weight"), shapes["tok_embeddings.weight"], "source")
            put("embedding.word_embeddings.weight", _pad_rows(emb, vocab), 0)
        for local in range(per_stage):
            i = stage * per_stage + local
            p, k = f"layers.{i}.", f"decoder.layers.{local}."
            w = {n: check_shape(p + n, get(p + n), shapes[p + n], "source") for n in (
                "attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                "feed_forward.w2.weight")}
            put(k + "input_layernorm.weight", w["attention_norm.weight"], None)
            put(k + "self_attention.linear_proj.weight", w["attention.wo.weight"], 1)
            extra(k + "self_attention.linear_proj")
            qkv = _fused_qkv(w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"], m)
            put(k + "self_attention.linear_qkv.weight", qkv, 0)
            extra(k + "self_attention.linear_qkv")
            put(k + "pre_mlp_layernorm.weight", w["ffn_norm.weight"], None)
            gates = torch.chunk(w["feed_forward.w1.weight"], tp, dim=0)
            ups = torch.chunk(w["feed_forward.w3.weight"], tp, dim=0)
            for r in range(tp):
                ranks[r][k + "mlp.linear_fc1.weight"] = torch.cat([gates[r], ups[r]], dim=0)
            extra(k + "mlp.linear_fc1")
            put(k + "mlp.linear_fc2.weight", w["feed_forward.w2.weight"], 1)
            extra(k + "mlp.linear_fc2")
        if stage == pp - 1:
            put("decoder.final_layernorm.weight", check_shape("norm.weight", get("norm.weight"), shapes["norm.weight"], "source"), None)
            if not m.tie_embeddings or pp > 1:
                name = "tok_embeddings.weight" if m.tie_embeddings else "output.weight"
                out_w = check_shape(name, get(name), shapes[name], "source")
                put("output_layer.weight", _pad_rows(out_w, vocab), 0)
            extra("output_layer")
        for r in range(tp):
            path = root / rank_dir_name(r, stage, pp) / FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": ranks[r], "checkpoint_version": 3.0, "iteration": 0, META_KEY: meta}, path)
            files.append(str(path.relative_to(out)))
        del ranks
    (out / TRACKER).write_text("release")
    (out / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
    return files + [TRACKER, SIDECAR]


# ---------------------------------------------------------------- reading


def _checkpoint_dir(path: Path) -> Path:
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else text
        if Path(name).name != name or name in (".", ".."):
            raise KilnError(f"{tracker} names {name[:60]!r}, which is not a directory inside {path}")
        sub = path / name
        if not sub.is_dir():
            raise KilnError(f"{tracker} names {sub.name}, which does not exist")
        return sub
    return path


def is_megatron_dir(path: Path) -> bool:
    path = Path(path)
    if (path / TRACKER).is_file() or (path / DIST_METADATA).is_file():
        return True
    return any(_RANK_DIR.match(p.name) and (p / FILE).is_file() for p in path.iterdir() if p.is_dir())


class MegatronEnum(NamedTuple):
    """What an enum member in Megatron-LM's `args` reads as: its class's name and its value,
    without importing megatron or running its code."""

    enum: str
    value: Any


def _enum_stand_in(qualified: str):
    def make(value: Any) -> MegatronEnum:
        return MegatronEnum(qualified, value)
    return make


def _numpy_globals() -> list:
    """numpy's RNG state (`np_rng_state`, a uint32 array) as Megatron-LM saves it: the array
    rebuild function under its numpy 2 and numpy 1 names, ndarray, dtype and the uint32 dtype's
    class (whose state BUILD sets); nothing else of numpy."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_ENUMS = ("megatron.core.transformer.enums.AttnBackend",)  # `args.attention_backend`


def safe_globals() -> list:
    """The exact allowlist for Megatron files on top of torch's weights-only set: the `args`
    Namespace, numpy's RNG state and the enum classes Megatron-LM stores in `args` (as stand-ins)."""
    return [argparse.Namespace, *_numpy_globals(), *[(_enum_stand_in(q), q) for q in _ENUMS]]


def _load(path: Path) -> dict:
    """Tensors and plain data only, plus `safe_globals()` (Megatron-LM's args and RNG state)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError, RuntimeError on a truncated zip, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(f"{path}: cannot read safely with weights_only=True: {first}") from None


def _meta_from_args(args: Any, path: Path) -> dict[str, Any]:
    """Model settings from a Megatron-LM checkpoint's `args`."""
    a = vars(args)
    need = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
    for key in need:
        if a.get(key) is None:
            raise KilnError(f"{path}: args.{key} missing; cannot tell the model shape")
    heads = a["num_attention_heads"]
    checks = {"swiglu": True, "add_bias_linear": False, "add_qkv_bias": False, "normalization": "RMSNorm",
              "position_embedding_type": "rope", "rotary_percent": 1.0, "qk_layernorm": False, "num_experts": None,
              "multi_latent_attention": False, "window_size": None, "apply_layernorm_1p": False,
              "layernorm_zero_centered_gamma": False, "softmax_scale": None}
    # absent from args means Megatron-LM's default, which for these three is not what kiln computes
    defaults = {"swiglu": False, "normalization": "LayerNorm", "position_embedding_type": "learned_absolute"}
    for key, ok in checks.items():
        value = a.get(key, defaults.get(key, ok))
        if value != ok:
            raise KilnError(f"{path}: args.{key}={value!r} is not supported by kiln (needs {ok!r})")
    interp = a.get("rotary_seq_len_interpolation_factor")
    return {
        "rope_scaling": bool(a.get("use_rope_scaling", False)), "rope_scaling_factor": a.get("rope_scaling_factor", 8.0),
        "seq_len_interpolation_factor": interp,
        "num_layers": a["num_layers"], "hidden_size": a["hidden_size"], "num_attention_heads": heads,
        "num_query_groups": a.get("num_query_groups") if a.get("group_query_attention") else heads,
        "kv_channels": a.get("kv_channels") or a["hidden_size"] // heads,
        "ffn_hidden_size": a.get("ffn_hidden_size"), "layernorm_epsilon": a.get("norm_epsilon", 1e-5),
        "rotary_base": a.get("rotary_base", 10000), "rotary_interleaved": a.get("rotary_interleaved", False),
        # the tokenizer's real vocab when Megatron-LM recorded it; padding rows beyond it are dropped
        "vocab_size": a.get("vocab_size") or a.get("padded_vocab_size"), "padded_vocab_size": a.get("padded_vocab_size"),
        "max_sequence_length": a.get("max_position_embeddings") or a.get("seq_length") or 2048,
        "share_embeddings_and_output_weights": not a.get("untie_embeddings_and_output_weights", False),
        "init_method_std": a.get("init_method_std", 0.02),
    }


def _rope_from_meta(meta: dict[str, Any]) -> Optional[RopeScalingConfig]:
    if meta.get("rope_scaling"):
        return RopeScalingConfig(type="llama3", factor=float(meta.get("rope_scaling_factor") or 8.0), **_MCORE_LLAMA3)
    if meta.get("seq_len_interpolation_factor"):
        return RopeScalingConfig(type="linear", factor=float(meta["seq_len_interpolation_factor"]))
    return None


def _config_from_meta(meta: dict[str, Any], origin: str) -> Config:
    for key, ok in (("rotary_percent", 1.0), ("normalization", "RMSNorm"), ("gated_linear_unit", True),
                    ("add_bias_linear", False), ("position_embedding_type", "rope")):
        if meta.get(key, ok) != ok:
            raise ConfigError(f"{origin}:{key}", f"{meta[key]!r} is not supported by kiln (needs {ok!r})")
    heads, groups = meta["num_attention_heads"], meta.get("num_query_groups") or meta["num_attention_heads"]
    kv_channels = meta.get("kv_channels")
    default_hd = meta["hidden_size"] // heads if meta["hidden_size"] % heads == 0 else None
    model = ModelConfig(
        name=Path(origin).name, vocab_size=meta["vocab_size"], d_model=meta["hidden_size"],
        n_layers=meta["num_layers"], n_heads=heads, n_kv_heads=None if groups == heads else groups,
        ffn_dim=meta["ffn_hidden_size"], norm_eps=float(meta["layernorm_epsilon"]),
        rope_theta=float(meta["rotary_base"]), max_seq_len=int(meta["max_sequence_length"]),
        tie_embeddings=bool(meta["share_embeddings_and_output_weights"]),
        init_std=float(meta.get("init_method_std", 0.02)),
        head_dim=None if kv_channels in (None, default_hd) else int(kv_channels),
        rope_scaling=_rope_from_meta(meta))
    cfg = Config(model=model)
    cfg.data.seq_len = min(cfg.data.seq_len, model.max_seq_len)
    validate_model(cfg)
    return cfg


def split_qkv(qkv: torch.Tensor, m: ModelConfig, key: str, meta: dict, origin: str) -> dict[str, torch.Tensor]:
    """A full (all TP ranks) fused linear_qkv weight -> kiln's wq, wk, wv (interleaved RoPE rows)."""
    groups, hd = m.kv_heads, m.dim_per_head
    check_shape(key, qkv, ((m.n_heads + 2 * groups) * hd, m.d_model), origin)
    q, k, v = torch.split(qkv.reshape(groups, -1, m.d_model), [m.n_heads // groups * hd, hd, hd], dim=1)
    q, k, v = (t.reshape(-1, m.d_model) for t in (q, k, v))
    if not meta.get("rotary_interleaved", False):
        q, k = half_to_interleaved(q, m.n_heads), half_to_interleaved(k, groups)
    return {"wq": q, "wk": k, "wv": v}


def check_writable(m: ModelConfig, tp: int, pp: int) -> None:
    """What both Megatron writers require of the model and the layout."""
    _refuse_unsupported(m)
    kv = m.kv_heads
    if tp < 1 or pp < 1:
        raise KilnError("--tp and --pp must be >= 1")
    if m.n_heads % tp or kv % tp:
        raise KilnError(f"--tp {tp} must divide the attention heads ({m.n_heads}) and query groups ({kv})")
    ffn = kiln_shapes(m)["layers.0.feed_forward.w1.weight"][0]
    if ffn % tp:
        raise KilnError(f"--tp {tp} must divide the feed-forward size {ffn}")
    if m.n_layers % pp:
        raise KilnError(f"--pp {pp} must divide the number of layers ({m.n_layers})")


class MegatronSource:
    """A Megatron-Core GPT checkpoint (any TP x PP) read through kiln names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        ckpt = _checkpoint_dir(self.path)
        found: dict[tuple[int, int], Path] = {}
        for p in sorted(ckpt.iterdir()):
            match = _RANK_DIR.match(p.name)
            if match and (p / FILE).is_file():
                found[(int(match.group(2) or 0), int(match.group(1)))] = p / FILE
        if not found:
            raise KilnError(f"{ckpt}: no mp_rank_XX[_YYY]/{FILE} files")
        self.pp = 1 + max(s for s, _ in found)
        self.tp = 1 + max(r for _, r in found)
        missing = [(s, r) for s in range(self.pp) for r in range(self.tp) if (s, r) not in found]
        if missing:
            s, r = missing[0]
            raise KilnError(f"{ckpt}: missing {rank_dir_name(r, s, self.pp)}/{FILE}")
        self.files = {key: _load(path) for key, path in found.items()}
        self.states = {}
        for key, blob in self.files.items():
            if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
                raise KilnError(f"{found[key]}: no 'model' state dict (virtual pipeline stages are not supported)")
            self.states[key] = blob["model"]
            unknown = [k for k in blob["model"] if not _KNOWN.match(k)]
            if unknown:
                raise KilnError(f"{found[key]}: tensor {unknown[0]} has no kiln counterpart "
                                f"(biases, learned positions and MoE are not supported)")
        self.meta = self._read_meta(found[(0, 0)])
        self.cfg = _config_from_meta(self.meta, str(self.path))
        self.shapes = kiln_shapes(self.cfg.model)
        self._stage_of: dict[int, tuple[int, int]] = {}
        first = 0
        for s in range(self.pp):
            count = len({int(k.split(".")[2]) for k in self.states[(s, 0)] if k.startswith("decoder.layers.")})
            for j in range(count):
                self._stage_of[first + j] = (s, j)
            first += count
        if first != self.cfg.model.n_layers:
            raise KilnError(f"{ckpt}: stages hold {first} layers, the config says {self.cfg.model.n_layers}")
        self._qkv_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    def _read_meta(self, first_file: Path) -> dict[str, Any]:
        blob = self.files[(0, 0)]
        if isinstance(blob.get(META_KEY), dict):
            return blob[META_KEY]
        if blob.get("args") is not None:
            return _meta_from_args(blob["args"], first_file)
        for candidate in (self.path / SIDECAR, first_file.parent.parent / SIDECAR):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise KilnError(f"{first_file}: no model settings (neither kiln metadata nor Megatron-LM args)")

    def _tensor(self, stage: int, rank: int, key: str, *aliases: str) -> torch.Tensor:
        state = self.states[(stage, rank)]
        for k in (key,) + aliases:
            if state.get(k) is not None:
                return state[k]
        raise KilnError(f"{self.path}: {rank_dir_name(rank, stage, self.pp)} has no tensor {key}")

    def _cat(self, stage: int, key: str, dim: int) -> torch.Tensor:
        return torch.cat([self._tensor(stage, r, key) for r in range(self.tp)], dim=dim)

    def _vocab(self, t: torch.Tensor, name: str) -> torch.Tensor:
        vocab = self.cfg.model.vocab_size
        if t.shape[0] < vocab:
            raise KilnError(f"{self.path}: {name} has {t.shape[0]} vocab rows, the config says {vocab}")
        return t[:vocab]

    def _attention(self, i: int) -> dict[str, torch.Tensor]:
        if self._qkv_cache and self._qkv_cache[0] == i:
            return self._qkv_cache[1]
        m = self.cfg.model
        stage, j = self._stage_of[i]
        key = f"decoder.layers.{j}.self_attention.linear_qkv.weight"
        qkv = self._cat(stage, key, 0)
        self._qkv_cache = (i, split_qkv(qkv, m, key, self.meta, str(self.path)))
        return self._qkv_cache[1]

    def get(self, name: str) -> torch.Tensor:
        t = self._get(name)
        return check_shape(name, t, self.shapes[name], str(self.path))

    def _get(self, name: str) -> torch.Tensor:
        m, last = self.cfg.model, self.pp - 1
        if name == "tok_embeddings.weight" or (name == "output.weight" and m.tie_embeddings):
            return self._vocab(self._cat(0, "embedding.word_embeddings.weight", 0), name)
        if name == "output.weight":
            return self._vocab(self._cat(last, "output_layer.weight", 0), name)
        if name == "norm.weight":
            return self._tensor(last, 0, "decoder.final_layernorm.weight")
        match = _LAYER.match(name)
        if not match or int(match.group(1)) not in self._stage_of:
            raise KilnError(f"{self.path}: no Megatron tensor for kiln name {name}")
        i, part = int(match.group(1)), match.group(2)
        stage, j = self._stage_of[i]
        k = f"decoder.layers.{j}."
        if part == "attention_norm.weight":
            return self._tensor(stage, 0, k + "input_layernorm.weight", k + "self_attention.linear_qkv.layer_norm_weight")
        if part == "ffn_norm.weight":
            return self._tensor(stage, 0, k + "pre_mlp_layernorm.weight", k + "mlp.linear_fc1.layer_norm_weight")
        if part in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"):
            return self._attention(i)[part.split(".")[1]]
        if part == "attention.wo.weight":
            return self._cat(stage, k + "self_attention.linear_proj.weight", 1)
        if part in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
            halves = [torch.chunk(self._tensor(stage, r, k + "mlp.linear_fc1.weight"), 2, dim=0) for r in range(self.tp)]
            return torch.cat([h[0 if part.endswith("w1.weight") else 1] for h in halves], dim=0)
        if part == "feed_forward.w2.weight":
            return self._cat(stage, k + "mlp.linear_fc2.weight", 1)
        raise KilnError(f"{self.path}: no Megatron tensor for kiln name {name}")
