"""Hugging Face Llama, Mistral, Qwen2 and Mixtral <-> kiln: names, config and the RoPE permutation.

Hugging Face's Llama applies RoPE by rotating halves of each head; kiln (like Meta's reference)
rotates interleaved pairs. Both compute the same attention if the q and k projection rows (and
their biases) are permuted, which is all that differs besides the names. Mistral is Llama with a
sliding attention window, Qwen2 is Llama with q/k/v biases; kiln holds all three as one model with
options and writes the family that has exactly those options. Mixtral is Mistral with a MoE in every
layer: kiln's stacked expert tensor (n_experts, out, in) is one Mixtral tensor per expert
(`block_sparse_moe.experts.J.wK`, the layout of the released checkpoints, which transformers 5 still
reads and writes). Tensors move one at a time: the
writer fills a shard until `max_shard_size` and flushes it; the reader opens safetensors lazily.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.convert.names import (validate_model, Source, cast, check_shape, half_to_interleaved,
                                    interleaved_to_half, iter_checked, kiln_shapes)
from kiln.config import Config, ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from kiln.data.tokenizer import RUN_IDENTITY
from kiln.errors import KilnError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
for _kiln, _hf in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                   ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                   ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                   ("feed_forward.w2", "mlp.down_proj")):
    for _kind in ("weight", "bias"):
        _LAYER_MAP[f"{_kiln}.{_kind}"] = f"{_hf}.{_kind}"
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM"}
_MOE_MAP = {"feed_forward.router.weight": "block_sparse_moe.gate.weight"}
_EXPERTS = re.compile(r"^feed_forward\.experts\.(w[123])$")
# Options of `RopeScalingConfig` written to / read from config.json for each rope type.
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                       "mscale_all_dim", "attention_factor", "truncate")}

_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}  # transformers' defaults: not written


def hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    match = _LAYER.match(name)
    hf = match and (_LAYER_MAP.get(match.group(2)) or _MOE_MAP.get(match.group(2)))
    if not hf:
        raise KilnError(f"no Hugging Face name for kiln tensor {name}")
    return f"model.layers.{match.group(1)}.{hf}"


def hf_names(name: str, m: ModelConfig) -> list[str]:
    """The Hugging Face tensors that make up kiln tensor `name`: one, or one per expert."""
    match = _LAYER.match(name)
    experts = match and _EXPERTS.match(match.group(2))
    if not experts:
        return [hf_name(name)]
    return [f"model.layers.{match.group(1)}.block_sparse_moe.experts.{j}.{experts.group(1)}.weight"
            for j in range(m.moe.n_experts)]


def to_hf_tensor(name: str, t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    if name.endswith(("attention.wq.weight", "attention.wq.bias")):
        return interleaved_to_half(t, m.n_heads)
    if name.endswith(("attention.wk.weight", "attention.wk.bias")):
        return interleaved_to_half(t, m.kv_heads)
    return t


def from_hf_tensor(name: str, t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    if name.endswith(("attention.wq.weight", "attention.wq.bias")):
        return half_to_interleaved(t, m.n_heads)
    if name.endswith(("attention.wk.weight", "attention.wk.bias")):
        return half_to_interleaved(t, m.kv_heads)
    return t


# ---------------------------------------------------------------- config


def hf_family(m: ModelConfig) -> str:
    """The transformers family that has exactly this model's options (llama, mistral, qwen2, mixtral)."""
    if m.moe is not None:
        e = m.moe
        for bad, why in ((e.every_n_layers != 1, "model.moe.every_n_layers: Mixtral has a MoE in every layer"),
                         (e.shared_experts != 0, "model.moe.shared_experts: Mixtral has no shared experts"),
                         (m.attention_bias or m.qkv_bias, "model.attention_bias/qkv_bias: Mixtral has no biases")):
            if bad:
                raise KilnError(f"{why}; cannot export to Hugging Face")
        return "mixtral"
    if m.attention_window is not None:
        if m.attention_bias or m.qkv_bias or m.mlp_bias:
            raise KilnError("model.attention_window: no Hugging Face family has a sliding window and biases "
                            "(Mistral has no biases); cannot export")
        return "mistral"
    if m.qkv_bias and not m.attention_bias and not m.mlp_bias:
        return "qwen2"
    return "llama"


def hf_rope(m: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) == `rope_scaling` plus rope_theta (transformers 4)."""
    r = m.rope_scaling
    if r is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    out = {"rope_type": r.type, "rope_theta": m.rope_theta}
    out.update({k: getattr(r, k) for k in _ROPE_KEYS[r.type]
                if getattr(r, k) is not None and _YARN_DEFAULTS.get(k) != getattr(r, k)})
    return out


def hf_config(m: ModelConfig, dtype: torch.dtype, special: dict[str, Any]) -> dict[str, Any]:
    """config.json for the model's family; RoPE in both the transformers 4 keys (`rope_theta`,
    `rope_scaling`) and the transformers 5 key (`rope_parameters`)."""
    family = hf_family(m)
    rope = hf_rope(m)
    config = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if m.rope_scaling is None else rope,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }
    if family == "llama":
        config.update(attention_bias=m.attention_bias, mlp_bias=m.mlp_bias, pretraining_tp=1)
    elif family == "mistral":
        config.update(sliding_window=m.attention_window)
    elif family == "mixtral":
        config.update(sliding_window=m.attention_window, num_local_experts=m.moe.n_experts,
                      num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.aux_loss_weight,
                      router_jitter_noise=0.0, output_router_logits=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
        if m.head_dim is None:
            del config["head_dim"]  # as in Qwen's own configs; transformers derives it
    return config


def _need(hf: dict, key: str, origin: str) -> Any:
    if key not in hf:
        raise ConfigError(f"{origin}:{key}", "missing from config.json")
    return hf[key]


def rope_from_hf(hf: dict, origin: str) -> tuple[float, Optional[RopeScalingConfig]]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{origin}:{key}", f"expected a mapping, got {rope!r}")
    type_key = "rope_type" if "rope_type" in rope or "type" not in rope else "type"
    rope_type = rope.get(type_key, "default")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError(f"{origin}:{key}.partial_rotary_factor", "partial rotary embeddings are not supported by kiln")
    if rope_type == "default":
        return theta, None
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"{origin}:{key}.{type_key}", f"{rope_type!r} RoPE scaling is not supported by kiln "
                          f"(supported: default, {', '.join(_ROPE_KEYS)})")
    values: dict[str, Any] = {}
    for name in _ROPE_KEYS[rope_type]:
        if rope.get(name) is not None:
            values[name] = rope[name]
    if "factor" not in values:
        raise ConfigError(f"{origin}:{key}.factor", f"missing; {rope_type} RoPE scaling needs it")
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in values:
        if rope_type == "llama3" or hf.get("max_position_embeddings") is None:
            raise ConfigError(f"{origin}:{key}.original_max_position_embeddings", f"missing; {rope_type} needs it")
        values["original_max_position_embeddings"] = hf["max_position_embeddings"]  # transformers' fallback
    try:
        scaling = RopeScalingConfig(type=rope_type, **{k: (bool(v) if k == "truncate" else
                                                          int(v) if k == "original_max_position_embeddings" else
                                                          float(v)) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}:{key}", f"cannot read {rope_type} RoPE scaling: {exc}") from None
    return theta, scaling


def _window_from_hf(hf: dict, family: str, origin: str) -> Optional[int]:
    layers = hf.get("num_hidden_layers", 0)
    if family == "llama":
        return None
    if family in ("mistral", "mixtral"):
        types = hf.get("layer_types")
        if types and len(set(types)) > 1:
            raise ConfigError(f"{origin}:layer_types", "alternating full/sliding attention is not supported by kiln")
        return hf.get("sliding_window")
    if not hf.get("use_sliding_window", False):
        return None
    first_windowed = hf.get("max_window_layers", layers)
    if first_windowed >= layers:
        return None
    if first_windowed > 0:
        raise ConfigError(f"{origin}:max_window_layers", "a sliding window on only some layers is not supported by kiln")
    return hf.get("sliding_window")


def _moe_from_hf(hf: dict, origin: str) -> MoEConfig:
    """Mixtral's router: dropless top-k with softmax over the chosen logits, as kiln's; it was trained
    without a z-loss, so the import sets none."""
    if float(hf.get("router_jitter_noise", 0.0) or 0.0) != 0.0:
        raise ConfigError(f"{origin}:router_jitter_noise", "router jitter is not supported by kiln (needs 0)")
    return MoEConfig(n_experts=int(_need(hf, "num_local_experts", origin)),
                     top_k=int(_need(hf, "num_experts_per_tok", origin)),
                     aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_weight=0.0)


def kiln_config_from_hf(hf: dict, origin: str, name: str) -> Config:
    """A kiln Config whose model matches a Llama, Mistral or Qwen2 config.json; refuses any
    setting that changes the math and that kiln lacks, naming its key."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"{origin}:model_type", f"{family!r} is not one of {', '.join(FAMILIES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{origin}:hidden_act", f"{hf['hidden_act']!r} is not supported by kiln (needs 'silu')")
    theta, scaling = rope_from_hf(hf, origin)
    d_model, heads = _need(hf, "hidden_size", origin), _need(hf, "num_attention_heads", origin)
    hd = hf.get("head_dim")
    kv = hf.get("num_key_value_heads") or heads
    bias = dict(attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False))) \
        if family == "llama" else dict(qkv_bias=family == "qwen2")
    model = ModelConfig(
        name=name,
        vocab_size=_need(hf, "vocab_size", origin),
        d_model=d_model,
        n_layers=_need(hf, "num_hidden_layers", origin),
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        ffn_dim=_need(hf, "intermediate_size", origin),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        head_dim=None if hd in (None, d_model // heads) and d_model % heads == 0 else int(hd),
        rope_scaling=scaling,
        attention_window=_window_from_hf(hf, family, origin),
        moe=_moe_from_hf(hf, origin) if family == "mixtral" else None,
        **bias,
    )
    cfg = Config(model=model)
    cfg.data.seq_len = min(cfg.data.seq_len, model.max_seq_len)
    validate_model(cfg)
    return cfg


# ---------------------------------------------------------------- writing


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB' or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise KilnError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB, 1000000)")
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


class SafetensorsShardWriter:
    """Fill safetensors shards up to a byte budget; name them model-XXXXX-of-YYYYY at the end."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].replace(self.out / SINGLE)
            return [SINGLE]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.replace(self.out / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX]


def _tokenizer_dir(source: Source) -> Optional[Path]:
    """Where the tokenizer the weights were trained with lives: the run directory's own copy (kept by
    `kiln train`, so a data directory prepared again later cannot swap it), else the data directory."""
    step_dir = getattr(source, "step_dir", None)
    run_dir = Path(step_dir).parent.parent if step_dir is not None else None
    if run_dir is not None and (run_dir / RUN_IDENTITY).is_file():  # byte-level runs keep no file
        return run_dir if (run_dir / "tokenizer.json").is_file() else None
    cfg = source.cfg
    paths = [cfg.data.path] + [m.get("path") if isinstance(m, dict) else getattr(m, "path", None)
                               for m in (cfg.data.mixture or [])]
    for p in paths:
        if p and (Path(p) / "tokenizer.json").is_file():
            return Path(p)
    return None


def _special_ids(data_dir: Optional[Path]) -> dict[str, Optional[int]]:
    """bos/eos/pad ids from the data manifest (or the run's kept tokenizer identity) when it records
    them (kiln appends EOS per doc)."""
    found: dict[str, Optional[int]] = {}
    for name in ("manifest.json", RUN_IDENTITY):
        if data_dir is None or not (data_dir / name).is_file():
            continue
        try:
            manifest = json.loads((data_dir / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(manifest, dict):
            continue
        for scope in (manifest, manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}):
            for key in ("bos", "eos", "pad"):
                for variant in (f"{key}_id", f"{key}_token_id", key):
                    if isinstance(scope.get(variant), int):
                        found.setdefault(key, scope[variant])
    return found


def _special_tokens(tokenizer_json: Path, special: dict[str, Optional[int]]) -> dict[str, str]:
    """{"eos_token": "<|endoftext|>", ...} for the ids we know, so `AutoTokenizer` sets them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    names = {k: tok.id_to_token(v) for k, v in special.items() if v is not None}
    return {f"{k}_token": v for k, v in names.items() if v is not None}


EXTRAS = "hf_extras"  # in an imported kiln run dir: what the model needs besides weights
SPECIAL = "special_tokens.json"
_CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "chat_template.jinja")


def save_extras(source: "HFSource", run_dir: Path) -> Path:
    """Keep an imported checkpoint's special-token ids, generation config and tokenizer beside the
    kiln run, so that exporting it (or a run started from it) gives them back."""
    out = Path(run_dir) / EXTRAS
    out.mkdir(parents=True, exist_ok=True)
    for name in _CARRIED:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)
    (out / SPECIAL).write_text(json.dumps(source.special, indent=2) + "\n")
    return out


def extras_dir(source: Source) -> Optional[Path]:
    """The imported extras for `source`: the HF directory itself, the kiln run's `hf_extras/`, or
    that of the run named by `checkpoint.init_from` (a run fine-tuned from an import)."""
    if isinstance(source, HFSource):
        return source.path
    candidates = []
    step_dir = getattr(source, "step_dir", None)
    if step_dir is not None:
        candidates.append(Path(step_dir).parent.parent / EXTRAS)
    init = source.cfg.checkpoint.init_from
    if init:
        candidates += [Path(init) / EXTRAS, Path(init).parent.parent / EXTRAS]
    return next((c for c in candidates if (c / SPECIAL).is_file()), None)


def _read_special(extras: Path, source: Source) -> dict[str, Any]:
    if isinstance(source, HFSource):
        return source.special
    try:
        found = json.loads((extras / SPECIAL).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KilnError(f"{extras / SPECIAL}: cannot read ({exc})") from None
    return {k: found.get(k) for k in ("bos", "eos", "pad")}


def write_hf(source: Source, out_dir: Path, max_shard_size: str | int = "5GB", dtype: str | None = None) -> list[str]:
    """Write `source` as a Hugging Face Llama, Mistral or Qwen2 directory; returns the files written.
    Special tokens, generation config and tokenizer come from the import the weights started from,
    else from the training data's tokenizer; torch_dtype says how the weights are stored."""
    m = source.cfg.model
    family = hf_family(m)  # refuse before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsShardWriter(out_dir, parse_size(max_shard_size))
    out_dtype = None
    for name, t in iter_checked(source, "kiln checkpoint"):
        if name == "output.weight" and m.tie_embeddings:
            continue  # transformers re-ties lm_head to embed_tokens
        t = cast(t, dtype)
        out_dtype = out_dtype or t.dtype
        names = hf_names(name, m)
        if len(names) == 1:
            writer.add(names[0], to_hf_tensor(name, t, m))
        else:  # stacked experts: one tensor each
            for key, expert in zip(names, t.unbind(0)):
                writer.add(key, expert.clone())
    files = writer.close()
    extras = extras_dir(source)
    data_dir = None if extras is not None else _tokenizer_dir(source)
    special = _read_special(extras, source) if extras is not None else _special_ids(data_dir)
    config = hf_config(m, out_dtype, special)
    assert config["model_type"] == family
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    if extras is not None:
        for name in _CARRIED:
            if (extras / name).is_file() and not (out_dir / name).exists():
                shutil.copyfile(extras / name, out_dir / name)
                files.append(name)
    if not (out_dir / "generation_config.json").exists():
        gen = {"_from_model_config": True, **{f"{k}_token_id": v for k, v in special.items() if v is not None}}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        files.append("generation_config.json")
    if data_dir is not None:
        shutil.copyfile(data_dir / "tokenizer.json", out_dir / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.max_seq_len,
                   **_special_tokens(data_dir / "tokenizer.json", special)}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        files += ["tokenizer.json", "tokenizer_config.json"]
    return files


# ---------------------------------------------------------------- reading


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / INDEX).is_file() or (path / SINGLE).is_file())


class HFSource:
    """A Hugging Face Llama directory read through kiln names, one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            hf = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KilnError(f"{self.path / 'config.json'}: cannot read ({exc})") from None
        self.cfg = kiln_config_from_hf(hf, str(self.path / "config.json"), name=self.path.name)
        gen = {}
        if (self.path / "generation_config.json").is_file():
            try:
                gen = json.loads((self.path / "generation_config.json").read_text())
            except json.JSONDecodeError as exc:
                raise KilnError(f"{self.path / 'generation_config.json'}: cannot read ({exc})") from None
        self.special = {k: hf.get(f"{k}_token_id", gen.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        else:
            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}
        self.shapes = kiln_shapes(self.cfg.model)
        known = {k for n in self.shapes for k in hf_names(n, self.cfg.model)}
        extra = sorted(k for k in weight_map if k not in known and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise KilnError(f"{self.path}: tensor {extra[0]} has no kiln counterpart "
                            f"({len(extra)} unexpected tensors; is this a plain Llama, Mistral or Qwen2 checkpoint?)")

    def get(self, name: str) -> torch.Tensor:
        keys = hf_names(name, self.cfg.model)
        if len(keys) > 1:  # stacked experts
            t = torch.stack([self._read(k) for k in keys])
            return check_shape(name, t, self.shapes[name], str(self.path))
        key = keys[0]
        if key not in self.weight_map and name == "output.weight" and self.cfg.model.tie_embeddings:
            key = hf_name("tok_embeddings.weight")
        if key not in self.weight_map:
            raise KilnError(f"{self.path}: no tensor {key} in the safetensors files")
        t = self._read(key)
        check_shape(key, t, self.shapes[name], str(self.path))
        return from_hf_tensor(name, t, self.cfg.model)

    def _read(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise KilnError(f"{self.path}: no tensor {key} in the safetensors files")
        file = self.weight_map[key]
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise KilnError(f"{self.path}: shard {file} (holding {key}) is missing")
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file].get_tensor(key)
