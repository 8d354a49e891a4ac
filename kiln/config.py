"""The kiln configuration: a structured schema (dataclasses) on OmegaConf.

One YAML tree with sections model, parallel, data, optim, train, checkpoint, cluster,
logging. Files may `include:` other files (paths relative to the including file); later
files and `key=value` overrides win. Unknown keys, wrong types and impossible
combinations raise `ConfigError` naming the dotted key, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kiln.errors import ConfigError

# kiln's bundled configs: shipped inside the package by setup.py (kiln/configs), or the repository's
# configs/ in a source checkout.
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent / "configs",
                               Path(__file__).resolve().parent.parent / "configs") if d.is_dir()),
                  Path(__file__).resolve().parent.parent / "configs")


@dataclass(frozen=True)
class Check:
    """The allowed values of one schema field, declared beside it and enforced once by `validate`.
    Floats must also be finite."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo < value instead of lo <= value
    hi_open: bool = False  # value < hi instead of value <= hi
    choices: tuple = ()
    name: bool = False  # a plain file name: letters, digits, '.', '_', '-'; not starting with '.'
    note: str = ""

    def problem(self, value: Any) -> Optional[str]:
        if value is None or isinstance(value, bool):
            return None
        if self.choices:
            names = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)  # YAML spelling
            return None if value in self.choices else f"{value!r} is not one of {names}"
        if self.name:
            if not (isinstance(value, str) and _PLAIN_NAME.fullmatch(value)):
                return (f"{str(value)[:60]!r} must be a plain name (letters, digits, '.', '_', '-'; at most "
                        f"128 characters, not starting with '.'): it names a directory under train.run_dir")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if isinstance(value, (int, float)):
            low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
            high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
            if not (low_ok and high_ok):
                low = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
                high = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
                return f"must be {' and '.join(b for b in (low, high) if b)}{self.note}, got {value}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def ranged(default: Any, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, note: str = "") -> Any:
    return field(default=default, metadata={"check": Check(lo, hi, lo_open, hi_open, note=note)})


def one_of(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"check": Check(choices=(default,) + choices)})


def plain_name(default: str) -> Any:
    return field(default=default, metadata={"check": Check(name=True)})


BIG = 2 ** 20  # a generous ceiling for widths and counts: catches a typo such as 1e11, not a real model


# Choices that code elsewhere dispatches on: declared once, checked at load (one_of), imported there.
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "math")
PP_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zero_bubble")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for long context, with Hugging Face's parameter names.
    llama3: Llama 3.1+ (factor, low/high_freq_factor, original_max_position_embeddings);
    linear: positions divided by factor; yarn: YaRN (factor, beta_fast/slow, mscale*, attention_factor)."""

    type: str = one_of("llama3", "linear", "yarn")
    factor: float = ranged(8.0, 0, lo_open=True)
    low_freq_factor: float = ranged(1.0, 0, lo_open=True)
    high_freq_factor: float = ranged(4.0, 0, lo_open=True)
    original_max_position_embeddings: Optional[int] = ranged(8192, 1, 2 ** 24)
    beta_fast: float = ranged(32.0, 0, lo_open=True)
    beta_slow: float = ranged(1.0, 0, lo_open=True)
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = ranged(None, 0, lo_open=True)
    truncate: bool = True


@dataclass
class AttentionPatternConfig:
    """Block-sparse causal attention (kiln.model.attention.SparsePattern): dense, strided (a local
    band plus every stride-th block back, Sparse Transformer / LongNet dilation) or local_global
    (a local band plus the first global_blocks blocks, Longformer/BigBird's global tokens)."""

    kind: str = one_of("dense", "strided", "local_global")
    block: int = ranged(64, 1, 2 ** 20)  # tokens per block
    local_blocks: int = ranged(1, 1, 2 ** 20)  # blocks of the band, the query's own included
    global_blocks: int = ranged(1, 0, 2 ** 20)  # local_global: leading blocks every query sees
    stride: int = ranged(4, 1, 2 ** 20)  # strided: every stride-th earlier block


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (kiln.model.moe): each MoE layer routes every token to
    top_k of n_experts SwiGLU experts (each of the dense ffn_hidden width) plus shared_experts
    always-on ones (DeepSeek-MoE). Layer i is MoE when (i + 1) % every_n_layers == 0 (Qwen's
    decoder_sparse_step); 1 makes every layer MoE (Mixtral)."""

    n_experts: int = ranged(8, 2, 4096)
    top_k: int = ranged(2, 1, 4096)
    capacity_factor: Optional[float] = ranged(None, 0, 1024, lo_open=True)  # None: dropless
    shared_experts: int = ranged(0, 0, 64)
    aux_loss_weight: float = ranged(0.01, 0, 100)  # load balancing (Switch), per sequence
    z_loss_weight: float = ranged(0.001, 0, 100)  # router z-loss (ST-MoE)
    every_n_layers: int = ranged(1, 1, 4096)


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = ranged(512, 1, 2 ** 24)
    d_model: int = ranged(64, 1, BIG)
    n_layers: int = ranged(2, 1, 4096)
    n_heads: int = ranged(4, 1, 4096)
    n_kv_heads: Optional[int] = ranged(None, 1, 4096)  # None: same as n_heads (no GQA)
    ffn_dim: Optional[int] = ranged(None, 1, 16 * BIG)  # None: Llama rule, 8/3 d_model rounded up to multiple_of
    multiple_of: int = ranged(32, 1, BIG)
    norm_eps: float = ranged(1e-5, 0, 1, lo_open=True)
    rope_theta: float = ranged(10000.0, 0, lo_open=True)
    max_seq_len: int = ranged(2048, 1, 2 ** 24)
    tie_embeddings: bool = False
    attention: str = one_of(*ATTENTION_BACKENDS)
    init_std: float = ranged(0.02, 0, 10, lo_open=True)
    head_dim: Optional[int] = ranged(None, 2, 4096)  # None: d_model / n_heads
    rope_scaling: Optional[RopeScalingConfig] = None  # None: plain RoPE
    attention_bias: bool = False  # biases on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    mlp_bias: bool = False  # biases on gate, up and down (Llama's mlp_bias)
    attention_window: Optional[int] = ranged(None, 1, 2 ** 24)  # sliding window: a query sees this many keys, itself included
    attention_pattern: Optional[AttentionPatternConfig] = None  # None: dense (see docs/training.md)
    position: str = one_of("rope", "alibi")  # alibi: per-head linear distance biases (Press et al.), no RoPE
    moe: Optional[MoEConfig] = None  # None: dense SwiGLU in every layer

    # Shape facts, resolved once here so the model, planner, converters and checks agree.
    @property
    def kv_heads(self) -> int:
        """Key/value heads (GQA groups): explicit, or one per query head."""
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        """Per-head width: explicit head_dim (Mistral Nemo, Gemma) or d_model / n_heads."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU hidden size: explicit ffn_dim, or Llama's 8/3 d_model rounded up to multiple_of."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.d_model / 3) / self.multiple_of)

    @property
    def params_per_layer(self) -> int:
        """Parameters of one transformer block: q/o, k/v and the three SwiGLU matrices, two norms, biases."""
        d, f = self.d_model, self.ffn_hidden
        d_q, d_kv = self.n_heads * self.dim_per_head, self.kv_heads * self.dim_per_head
        n = 2 * d * d_q + 2 * d * d_kv + 3 * d * f + 2 * d
        n += d_q + 2 * d_kv if self.attention_bias or self.qkv_bias else 0
        n += d if self.attention_bias else 0
        n += 2 * f + d if self.mlp_bias else 0
        return n

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.every_n_layers == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def layer_params(self, layer: int, active: bool = False) -> int:
        """Parameters of block `layer`: a MoE block has a router and n_experts (active: top_k)
        routed experts plus its shared ones in place of the dense SwiGLU."""
        if not self.is_moe_layer(layer):
            return self.params_per_layer
        mlp = 3 * self.d_model * self.ffn_hidden
        experts = (self.moe.top_k if active else self.moe.n_experts) + self.moe.shared_experts
        return self.params_per_layer - mlp + experts * mlp + self.d_model * self.moe.n_experts

    def tp_conflict(self, tp: int) -> Optional[str]:
        """Why tensor parallelism of degree `tp` cannot split this model, or None if it can."""
        for what, n in (("model.n_heads", self.n_heads), ("model.n_kv_heads", self.kv_heads),
                        ("model ffn_dim", self.ffn_hidden), ("model.vocab_size", self.vocab_size)):
            if n % tp:
                extra = " (vocab-parallel embedding/output)" if what == "model.vocab_size" else ""
                return f"{what}={n} is not divisible by tp={tp}{extra}"
        return None


@dataclass
class ParallelConfig:
    engine: str = one_of("native", "deepspeed")
    pp: int = ranged(1, 1, 4096)
    dp_replicate: int = ranged(1, 1, BIG)
    dp_shard: int = ranged(-1, -1, BIG)  # -1: the rest of the world
    tp: int = ranged(1, 1, 4096)
    cp: int = ranged(1, 1, 4096)  # context parallel: the sequence split over cp ranks (ring attention)
    ep: int = ranged(1, 1, 4096)  # expert parallel: MoE experts sharded over ep ranks taken from dp_shard
    sequence_parallel: bool = True  # only meaningful with tp > 1
    pp_schedule: str = one_of(*PP_SCHEDULES)
    pp_microbatches: Optional[int] = ranged(None, 1, BIG)  # None: equal to pp
    pp_virtual_stages: int = ranged(1, 1, 4096)  # stages per rank (interleaved schedules need > 1)
    activation_checkpoint: str = one_of("none", "selective", "full")
    # auto: per-block torch.compile on CUDA, eager on CPU (see kiln.parallel.parallelize.compile_enabled)
    compile: Union[bool, str] = field(default="auto", metadata={"check": Check(choices=("auto", True, False))})
    reshard_after_forward: bool = True
    mixed_precision: str = one_of("auto", "bf16", "fp32")  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = ranged(1, 0, 3)  # deepspeed engine only
    offload_optimizer: bool = False  # deepspeed engine only
    init: str = one_of("auto", "full", "sharded")  # auto: full below 2 GiB of fp32 weights; see docs/parallelism.md


@dataclass
class DatasetSource:
    path: str = "???"
    weight: float = ranged(1.0, 0, lo_open=True)


@dataclass
class PrepareConfig:
    """How `kiln train` prepares `data.path` on first run when it does not exist yet."""

    inputs: list = field(default_factory=list)  # files, globs, or "stdlib"
    tokenizer: str = "bpe:2048"  # path/to/tokenizer.json | bpe:VOCAB | byte
    text_field: str = "text"
    samples_per_shard: int = ranged(2048, 1, BIG)
    val_fraction: float = ranged(0.01, 0, 0.5)
    max_bytes: Optional[int] = ranged(None, 1)
    sample_tokens: int = ranged(2048, 1, 2 ** 24)  # tokens per stored sample (the loader packs across samples)


@dataclass
class DataConfig:
    path: Optional[str] = None  # a `kiln data prepare` output directory
    mixture: List[DatasetSource] = field(default_factory=list)  # [{path, weight}] instead of path
    synthetic: Optional[str] = None  # "markov": a random order-1 Markov chain (tests)
    synthetic_vocab: int = ranged(64, 1, 2 ** 16)  # tokens the Markov chain uses (<= model.vocab_size)
    seq_len: int = ranged(128, 1, 2 ** 24)
    num_workers: int = ranged(1, 0, 256)
    shuffle_buffer: int = ranged(256, 0, BIG)
    seed: int = ranged(1234, 0, 2 ** 32 - 1)
    on_bad_shard: str = one_of("fail", "skip")
    document_mask: bool = False
    prepare: Optional[PrepareConfig] = None


@dataclass
class OptimConfig:
    lr: float = ranged(3e-3, 0, 10, lo_open=True)
    min_lr_ratio: float = ranged(0.1, 0, 1)
    weight_decay: float = ranged(0.1, 0, 10)
    beta1: float = ranged(0.9, 0, 1, hi_open=True)
    beta2: float = ranged(0.95, 0, 1, hi_open=True)
    eps: float = ranged(1e-8, 0, 1, lo_open=True)
    warmup_steps: int = ranged(20, 0)
    decay: str = one_of("cosine", "linear", "wsd", "constant")
    wsd_decay_fraction: float = ranged(0.2, 0, 1, lo_open=True)
    grad_clip: float = ranged(1.0, 0, note=" (0: no clipping)")
    # auto: fused AdamW where the device has it (kiln.optim.fused_adamw); true/false (YAML's on/off) force it
    fused: Union[bool, str] = field(default="auto", metadata={"check": Check(choices=("auto", True, False))})


@dataclass
class TrainConfig:
    name: str = plain_name("default")
    run_dir: str = "runs"
    steps: int = ranged(200, 0)
    micro_batch: int = ranged(8, 1, BIG)
    global_batch_tokens: Optional[int] = ranged(None, 1)  # None: one micro-batch per DP rank
    seed: int = ranged(0, 0, 2 ** 32 - 1)
    device: str = one_of("auto", "cpu", "cuda")
    eval_every: int = ranged(50, 0, note=" (0: no evaluation)")
    eval_steps: int = ranged(4, 0)
    max_time_s: Optional[float] = ranged(None, 0, lo_open=True)  # stop (with a checkpoint) after this long
    noise_scale: bool = False  # log the gradient noise scale (kiln/noise_scale.py); needs grad accumulation
    # batch-size ramp-up (kiln/batch_ramp.py): the first step's global batch, growing linearly over
    # batch_ramp_tokens consumed tokens to global_batch_tokens; None: no ramp
    batch_ramp_start_tokens: Optional[int] = ranged(None, 1)
    batch_ramp_tokens: Optional[int] = ranged(None, 1)


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = ranged(100, 1)
    keep_last: int = ranged(2, 1)
    async_save: bool = False
    resume: bool = True  # resume from checkpoints/latest when present
    init_from: Optional[str] = None  # load weights only from another checkpoint
    allow_changes: bool = False  # resume although lr, schedule or batch differ from the checkpoint's run


@dataclass
class ClusterConfig:
    launcher: str = one_of("local", "mpi", "slurm")
    nodes: int = ranged(1, 1, BIG)
    gpus_per_node: int = ranged(0, 0, 1024)
    nproc_per_node: Optional[int] = ranged(None, 1, 1024)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: Optional[str] = None
    exclusive: bool = False
    cpus_per_task: Optional[int] = ranged(None, 1, 4096)
    modules: list = field(default_factory=list)
    container_image: Optional[str] = None
    env: dict = field(default_factory=dict)
    template: Optional[str] = None
    requeue: bool = True
    signal_grace_s: int = ranged(120, 0, 86400)
    max_restarts: int = ranged(0, 0, 1000)


@dataclass
class WandbConfig:
    """Weights & Biases tracking (`pip install 'kiln[trackers]'`); setting any key turns it on."""

    project: str = "kiln"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: train.name
    tags: List[str] = field(default_factory=list)
    mode: str = "online"  # online | offline (files under <dir>/wandb; `wandb sync` them later) | disabled
    dir: Optional[str] = None  # None: the run directory


@dataclass
class MlflowConfig:
    """MLflow tracking (`pip install 'kiln[trackers]'`); setting any key turns it on."""

    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns
    experiment: str = "kiln"
    run_name: Optional[str] = None  # None: train.name
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    log_every: int = ranged(10, 1)
    tensorboard: bool = True
    progress: bool = True
    wandb: Optional[WandbConfig] = None  # e.g. logging.wandb.mode=offline
    mlflow: Optional[MlflowConfig] = None  # e.g. logging.mlflow.experiment=scaling


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _check_fields(obj: Any, prefix: str) -> None:
    """Apply every field's declared `Check` (recursing into sections, lists of sections)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        check = f.metadata.get("check")
        if check is not None:
            problem = check.problem(value)
            if problem:
                raise ConfigError(key, problem)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_fields(item, f"{key}.{i}.")


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Read a YAML file, resolving its `include:` list depth-first (includes first)."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    if path in seen:
        raise ConfigError(str(path), "include cycle")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # say where, never echo the file's text (it may not be a config at all)
        raise ConfigError(str(path), f"cannot parse YAML{_yaml_where(exc)}") from None
    if raw is None:
        raw = OmegaConf.create({})
    if not isinstance(raw, DictConfig):
        raise ConfigError(str(path), f"the top level must be a mapping of sections, not a {'list' if OmegaConf.is_list(raw) else type(raw).__name__}")
    includes = raw.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not (OmegaConf.is_list(includes) or isinstance(includes, list)) or \
            not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include", "must be a file name or a list of file names")
    parts = [_read_yaml(_resolve_include(path, inc), seen + (path,)) for inc in includes]
    return OmegaConf.merge(*parts, raw) if parts else raw


def _yaml_where(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else f": {problem}"


def find_config(name: str | Path) -> Path:
    """A config path as given: relative to the working directory first, then to kiln's bundled
    configs (with or without a leading `configs/`), so `configs/train/quickstart.yaml` works anywhere."""
    path = Path(name).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    bundled = CONFIG_DIR.joinpath(*parts) if parts else CONFIG_DIR
    if bundled.is_file():
        return bundled
    raise ConfigError(str(name), f"config file not found (looked in {Path.cwd()} and in kiln's bundled {CONFIG_DIR})")


def _resolve_include(parent: Path, name: str) -> Path:
    candidate = parent.parent / name
    if candidate.is_file():
        return candidate
    packaged = CONFIG_DIR / name
    return packaged if packaged.is_file() else candidate


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key else "config"


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults, YAML files (left to right) and dotlist overrides, then validate."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        for p in paths:
            merged = OmegaConf.merge(merged, _read_yaml(find_config(p)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "override must look like key=value")
            key = item.split("=", 1)[0]
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as exc:  # name the override, not just the innermost field
                inner = _key_of(exc)
                raise ConfigError(key if inner in key else f"{key}.{inner}", str(exc).splitlines()[0]) from None
            except Exception as exc:  # YAML cannot read the value (`, @, {{ ...)
                raise ConfigError(key, f"cannot parse the value{_yaml_where(exc)}; quote it: "
                                       f"{key}='\"...\"'") from None
        cfg = OmegaConf.to_object(merged)
        _absolute_paths(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(_key_of(exc), msg) from None
    validate(cfg)
    return cfg


def _absolute_paths(cfg: Config) -> None:
    """Data and checkpoint paths are relative to where the command runs; the saved config holds
    them absolute so that workers, `kiln generate` and `kiln convert` work from any directory."""
    def absolute(path: str) -> str:  # no symlink resolution: container mounts see the path as written
        return os.path.abspath(os.path.expanduser(path))

    d = cfg.data
    if d.path:
        d.path = absolute(d.path)
    for item in d.mixture:
        item.path = absolute(item.path)
    if d.prepare is not None:
        d.prepare.inputs = [i if i == "stdlib" or i.startswith("hf:") else absolute(i) for i in d.prepare.inputs]
        if not d.prepare.tokenizer.startswith(("bpe:", "byte")):
            d.prepare.tokenizer = absolute(d.prepare.tokenizer)
    if cfg.checkpoint.init_from:
        cfg.checkpoint.init_from = absolute(cfg.checkpoint.init_from)
    cfg.train.run_dir = absolute(cfg.train.run_dir)


def run_dir_of(cfg: Config) -> Path:
    return Path(os.path.abspath(Path(cfg.train.run_dir) / cfg.train.name))


def save_run_config(cfg: Config) -> Path:
    """Write <run_dir>/config.yaml atomically (other workers may be reading it), only if it changed."""
    run_dir = run_dir_of(cfg)
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (path.is_file() and path.read_text() == text):
            tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError("train.run_dir", f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None
    return path


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    """Rebuild a Config from `to_yaml` output (used for saved run configs)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)


def config_hash(cfg: Config) -> str:
    """A short hash of the model's tensor shapes: checkpoints refuse to load into a different
    shape, but not into a recipe that only renames the model or changes its attention kernel."""
    m = cfg.model
    shape = (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.ffn_hidden, m.tie_embeddings)
    variant = (m.dim_per_head, m.attention_bias, m.qkv_bias, m.mlp_bias)
    if variant != (m.d_model // m.n_heads, False, False, False):  # older hashes stay valid
        shape += variant
    if m.moe is not None:  # routing knobs (weights, capacity) may change; the expert layout may not
        shape += ("moe", m.moe.n_experts, m.moe.shared_experts, m.moe.every_n_layers)
    return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]




def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def validate(cfg: Config) -> None:
    """Check each field against the range declared beside it, then the rules that join fields."""
    _check_fields(cfg, "")
    m = cfg.model
    if m.head_dim is None:
        _check(m.d_model % m.n_heads == 0, "model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
        _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head dim (d_model / n_heads) must be even for RoPE")
    else:
        _check(m.head_dim % 2 == 0, "model.head_dim", f"{m.head_dim} must be even for RoPE")
    _validate_rope_scaling(m)
    if m.position == "alibi":
        _check(m.rope_scaling is None, "model.rope_scaling", "applies to RoPE only; unset it with model.position=alibi")
    if m.attention_pattern is not None and m.attention_pattern.kind != "dense":
        _check(m.attention_window is None, "model.attention_window",
               "set either a sliding window or model.attention_pattern, not both")
    _check(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", f"{m.kv_heads} must divide model.n_heads={m.n_heads}")
    _validate_moe(cfg)
    _check(cfg.parallel.dp_shard != 0, "parallel.dp_shard", "must be >= 1, or -1 for the rest of the world")
    _validate_layout(cfg)
    d = cfg.data
    _check(d.seq_len <= m.max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(d.synthetic in (None, "markov"), "data.synthetic", f"{d.synthetic!r} is not one of markov")
    if d.synthetic:
        _check(d.synthetic_vocab <= m.vocab_size, "data.synthetic_vocab",
               f"{d.synthetic_vocab} must be in 1..model.vocab_size={m.vocab_size}")
    else:
        _check(bool(d.path or d.mixture), "data.path", "set data.path (or data.mixture, or data.synthetic=markov)")
    t = cfg.train
    _check(t.eval_steps >= 1 or t.eval_every == 0, "train.eval_steps", "must be >= 1 when train.eval_every > 0")
    _validate_trackers(cfg)
    _validate_cluster(cfg)


def _validate_moe(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.moe is None:
        _check(p.ep == 1, "parallel.ep", f"{p.ep} needs a MoE model (set model.moe.n_experts)")
        return
    e = m.moe
    _check(e.top_k <= e.n_experts, "model.moe.top_k", f"{e.top_k} exceeds model.moe.n_experts={e.n_experts}")
    _check(e.every_n_layers <= m.n_layers, "model.moe.every_n_layers",
           f"{e.every_n_layers} exceeds model.n_layers={m.n_layers}: no layer would be MoE")
    _check(not m.mlp_bias, "model.mlp_bias", "MoE experts have no biases; unset model.mlp_bias")
    _check(p.tp == 1 or p.init != "sharded", "parallel.init",
           "sharded initialization gives each TP rank its own copy of the MoE router and experts (tp > 1 "
           "replicates them); use parallel.init=full or auto")
    if p.ep > 1:
        _check(e.n_experts % p.ep == 0, "parallel.ep", f"{p.ep} does not divide model.moe.n_experts={e.n_experts}")
        _check(p.engine == "native", "parallel.ep", "expert parallelism needs parallel.engine=native")
        _check(p.dp_replicate == 1, "parallel.ep", "expert parallelism borrows ranks from dp_shard; "
               "leave parallel.dp_replicate=1")
        _check(p.dp_shard == -1 or p.dp_shard % p.ep == 0, "parallel.ep",
               f"{p.ep} does not divide parallel.dp_shard={p.dp_shard} (ep borrows data-parallel ranks)")
        _check(p.activation_checkpoint != "selective", "parallel.activation_checkpoint",
               "selective recomputation is not supported with parallel.ep > 1 (the experts' own FSDP hooks run "
               "inside each block, and their all-gathers differ between forward and recompute); use full")


def _validate_rope_scaling(m: ModelConfig) -> None:
    r = m.rope_scaling
    if r is None:
        return
    if r.type in ("llama3", "yarn"):
        _check(r.original_max_position_embeddings is not None and r.original_max_position_embeddings > 0,
               "model.rope_scaling.original_max_position_embeddings", f"must be positive for {r.type}")
    if r.type == "llama3":
        _check(r.high_freq_factor > r.low_freq_factor, "model.rope_scaling.high_freq_factor",
               "must exceed model.rope_scaling.low_freq_factor")


def _validate_trackers(cfg: Config) -> None:
    """Experiment trackers: known modes, and the library importable before any worker starts."""
    import importlib.util

    if cfg.logging.wandb is not None:
        mode = cfg.logging.wandb.mode
        _check(mode in ("online", "offline", "disabled"), "logging.wandb.mode",
               f"{mode!r} is not one of online, offline, disabled")
    for key, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(cfg.logging, key) is not None:
            _check(importlib.util.find_spec(module) is not None, f"logging.{key}",
                   f"needs the `{module}` package (pip install 'kiln[trackers]')")


def pipeline_microbatches(cfg: Config) -> int:
    """Micro-batches a pipeline schedule splits each train.micro_batch into (1 without pp)."""
    p = cfg.parallel
    return (p.pp_microbatches or p.pp) if p.pp > 1 else 1


def _validate_layout(cfg: Config) -> None:
    """The layout rules that need no world size: what tensor and pipeline parallelism require of the
    model, the batch and the schedule. `kiln.distributed.parallel_dims` adds the world-size check."""
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tp, p.pp
    conflict = m.tp_conflict(tp)
    _check(conflict is None, "parallel.tp", conflict or "")
    if p.sequence_parallel and tp > 1:
        _check(cfg.data.seq_len % tp == 0, "data.seq_len",
               f"{cfg.data.seq_len} is not divisible by tp={tp} (sequence parallel shards the sequence)")
    if m.tie_embeddings:
        _check(tp == 1 and pp == 1, "model.tie_embeddings", "tied embeddings need tp=1 and pp=1")
    virtual = p.pp_virtual_stages if pp > 1 else 1
    if pp > 1 and p.pp_schedule in ("gpipe", "1f1b"):
        _check(virtual == 1, "parallel.pp_virtual_stages",
               f"{p.pp_schedule} runs one stage per rank; use interleaved_1f1b or zero_bubble for virtual stages")
    if pp > 1 and p.pp_schedule == "interleaved_1f1b":
        _check(virtual > 1, "parallel.pp_virtual_stages", "interleaved_1f1b needs pp_virtual_stages > 1")
    _check(m.n_layers >= pp * virtual, "parallel.pp",
           f"model.n_layers={m.n_layers} < pipeline stages pp*pp_virtual_stages={pp * virtual}")
    if pp > 1:
        micro = pipeline_microbatches(cfg)
        _check(micro >= pp, "parallel.pp_microbatches", f"{micro} must be >= pp={pp}")
        _check(cfg.train.micro_batch % micro == 0, "parallel.pp_microbatches",
               f"train.micro_batch={cfg.train.micro_batch} is not divisible by {micro} pipeline micro-batches")
        if virtual > 1 or p.pp_schedule == "zero_bubble":
            _check(micro % pp == 0, "parallel.pp_microbatches",
                   f"{p.pp_schedule} needs micro-batches ({micro}) to be a multiple of pp={pp}")
    if p.cp > 1:
        _validate_context_parallel(cfg)
    if p.engine == "deepspeed":
        _check(tp == 1 and pp == 1 and p.cp == 1, "parallel.engine",
               "deepspeed supports DP-only layouts (tp=1, pp=1, cp=1)")
        _check(p.dp_replicate == 1, "parallel.dp_replicate", "deepspeed shards over all DP ranks; leave dp_replicate=1")
        _check(p.init != "sharded", "parallel.init", "sharded initialization needs parallel.engine=native; "
               "DeepSpeed builds the full model on every rank before ZeRO partitions it")
        _check(not p.offload_optimizer or p.zero_stage >= 1, "parallel.offload_optimizer",
               "needs parallel.zero_stage >= 1")


def _validate_context_parallel(cfg: Config) -> None:
    """What the ring attention (kiln.parallel.context) needs: 2*cp equal chunks of the sequence,
    a plain causal mask with RoPE and the native engine."""
    p, m, cp = cfg.parallel, cfg.model, cfg.parallel.cp
    seq = cfg.data.seq_len
    _check(seq % (2 * cp) == 0, "data.seq_len",
           f"{seq} is not divisible by 2*cp={2 * cp} (each cp rank holds two equal chunks of the sequence)")
    if p.sequence_parallel and p.tp > 1:
        _check((seq // cp) % p.tp == 0, "data.seq_len",
               f"{seq}/cp={seq // cp} is not divisible by tp={p.tp} (sequence parallel shards each cp rank's tokens)")
    _check(not cfg.data.document_mask, "data.document_mask",
           "document masks are not supported with parallel.cp > 1 (the ring computes a plain causal mask)")
    _check(m.position == "rope", "model.position", "alibi is not supported with parallel.cp > 1; use rope")
    _check(m.attention_window is None, "model.attention_window",
           "sliding windows are not supported with parallel.cp > 1")
    _check(m.attention_pattern is None or m.attention_pattern.kind == "dense", "model.attention_pattern",
           "block-sparse attention is not supported with parallel.cp > 1")
    _check(m.moe is None, "model.moe", "MoE is not supported with parallel.cp > 1 yet (its per-sequence "
           "balance loss would see only each rank's chunks, and experts are not sharded over cp)")


# What a cluster field may hold: each is written on an `#SBATCH` line (sbatch splits those itself;
# no shell, but no spaces either).
SBATCH_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
SBATCH_FIELDS = {
    "partition": (r"[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*", "partition"),
    "account": (SBATCH_NAME, "account"),
    "qos": (SBATCH_NAME, "QOS"),
    "constraint": (r"[A-Za-z0-9._,&|()\[\]*!:+-]+", "constraint"),
    "time": (r"\d+(:\d+){1,2}|\d+-\d+(:\d+){0,2}", "time limit (HH:MM:SS, MM:SS or D-HH[:MM[:SS]])"),
}
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def _validate_cluster(cfg: Config) -> None:
    c = cfg.cluster
    if c.time is not None and str(c.time).isdigit():
        # YAML reads an unquoted 12:00:00 as the integer 43200 (base 60); refuse to guess the unit.
        raise ConfigError("cluster.time", f"{c.time!r} is a bare number: write a quoted string such as "
                                          "'12:00:00' or '2-00:00:00' (YAML turns unquoted 12:00:00 into 43200)")
    for key, (pattern, what) in SBATCH_FIELDS.items():
        value = getattr(c, key)
        if value not in (None, ""):
            _check(re.fullmatch(pattern, str(value)) is not None, f"cluster.{key}",
                   f"{str(value)!r} is not a valid {what} (it would be written on an #SBATCH line)")
    for key in c.env or {}:
        _check(re.fullmatch(ENV_NAME, str(key)) is not None, f"cluster.env.{key}",
               "is not a valid environment variable name")


def resolve_world(cfg: Config, world_size: int) -> dict[str, int]:
    """Derive every mesh dim from the config and world size; dp_shard=-1 takes the rest."""
    p = cfg.parallel
    fixed = p.pp * p.dp_replicate * p.cp * p.tp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        _check(world_size % fixed == 0, "parallel.dp_shard",
               f"world size {world_size} is not divisible by pp*dp_replicate*cp*tp={fixed}")
        dp_shard = world_size // fixed
    _check(fixed * dp_shard == world_size, "parallel",
           f"pp*dp_replicate*dp_shard*cp*tp = {p.pp}*{p.dp_replicate}*{dp_shard}*{p.cp}*{p.tp} = {fixed * dp_shard} "
           f"!= world size {world_size}")
    _check(dp_shard % p.ep == 0, "parallel.ep", f"{p.ep} does not divide dp_shard={dp_shard} "
           f"(ep borrows data-parallel ranks)")
    return {"pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "cp": p.cp, "tp": p.tp}


def micro_step_tokens(cfg: Config, dp_size: int) -> int:
    """Tokens one micro-step consumes over all DP ranks."""
    return cfg.train.micro_batch * cfg.data.seq_len * dp_size


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    """Micro-steps per optimizer step so that a step sees train.global_batch_tokens tokens."""
    per_micro = micro_step_tokens(cfg, dp_size)
    target = cfg.train.global_batch_tokens
    if target is None:
        return 1
    _check(target % per_micro == 0, "train.global_batch_tokens",
           f"{target} is not a multiple of micro_batch*seq_len*dp = {per_micro}")
    return target // per_micro


def tokens_per_step(cfg: Config, dp_size: int) -> int:
    """Tokens one optimizer step consumes: train.global_batch_tokens, or one micro-batch per DP rank."""
    return micro_step_tokens(cfg, dp_size) * grad_accum_steps(cfg, dp_size)


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
