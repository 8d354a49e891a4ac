"""The kiln configuration: a structured schema (dataclasses) on OmegaConf.

One YAML tree with sections model, parallel, data, optim, train, checkpoint, cluster,
logging. Files may `include:` other files (paths relative to the including file); later
files and `key=value` overrides win. Unknown keys, wrong types and impossible
combinations raise `ConfigError` naming the dotted key, before any process group starts.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kiln.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    ffn_dim: Optional[int] = None  # None: Llama rule, 8/3 d_model rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: str = "auto"  # auto | flash | sdpa | math
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    engine: str = "native"  # native | deepspeed
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the rest of the world
    tp: int = 1
    sequence_parallel: bool = True  # only meaningful with tp > 1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zero_bubble
    pp_microbatches: Optional[int] = None  # None: equal to pp
    pp_virtual_stages: int = 1  # stages per rank (interleaved schedules need > 1)
    activation_checkpoint: str = "none"  # none | selective | full
    compile: bool = False
    reshard_after_forward: bool = True
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    zero_stage: int = 1  # deepspeed engine only
    offload_optimizer: bool = False  # deepspeed engine only
    init: str = "auto"  # auto (full below 2 GiB of fp32 weights) | full | sharded; see docs/parallelism.md


@dataclass
class DatasetSource:
    path: str = "???"
    weight: float = 1.0


@dataclass
class PrepareConfig:
    """How `kiln train` prepares `data.path` on first run when it does not exist yet."""

    inputs: list = field(default_factory=list)  # files, globs, or "stdlib"
    tokenizer: str = "bpe:2048"  # path/to/tokenizer.json | bpe:VOCAB | byte
    text_field: str = "text"
    samples_per_shard: int = 2048
    val_fraction: float = 0.01
    max_bytes: Optional[int] = None
    sample_tokens: int = 2048  # tokens per stored sample (the loader packs across samples)


@dataclass
class DataConfig:
    path: Optional[str] = None  # a `kiln data prepare` output directory
    mixture: List[DatasetSource] = field(default_factory=list)  # [{path, weight}] instead of path
    synthetic: Optional[str] = None  # "markov": a random order-1 Markov chain (tests)
    synthetic_vocab: int = 64  # tokens the Markov chain uses (<= model.vocab_size)
    seq_len: int = 128
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 1234
    on_bad_shard: str = "fail"  # fail | skip
    document_mask: bool = False
    prepare: Optional[PrepareConfig] = None


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear | wsd | constant
    wsd_decay_fraction: float = 0.2
    grad_clip: float = 1.0
    fused: str = "auto"  # auto | on | off


@dataclass
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs"
    steps: int = 200
    micro_batch: int = 8
    global_batch_tokens: Optional[int] = None  # None: one micro-batch per DP rank
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 50
    eval_steps: int = 4
    max_time_s: Optional[float] = None  # stop (with a checkpoint) after this long
    noise_scale: bool = False  # log the gradient noise scale (kiln/noise_scale.py); needs grad accumulation


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep_last: int = 2
    async_save: bool = False
    resume: bool = True  # resume from checkpoints/latest when present
    init_from: Optional[str] = None  # load weights only from another checkpoint


@dataclass
class ClusterConfig:
    launcher: str = "local"  # local | mpi | slurm
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: Optional[str] = None
    exclusive: bool = False
    cpus_per_task: Optional[int] = None
    modules: list = field(default_factory=list)
    container_image: Optional[str] = None
    env: dict = field(default_factory=dict)
    template: Optional[str] = None
    requeue: bool = True
    signal_grace_s: int = 120
    max_restarts: int = 0


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


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


CHOICES = {
    "model.attention": ("auto", "flash", "sdpa", "math"),
    "parallel.engine": ("native", "deepspeed"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"),
    "parallel.activation_checkpoint": ("none", "selective", "full"),
    "parallel.mixed_precision": ("auto", "bf16", "fp32"),
    "parallel.init": ("auto", "full", "sharded"),
    "data.on_bad_shard": ("fail", "skip"),
    "optim.decay": ("cosine", "linear", "wsd", "constant"),
    "optim.fused": ("auto", "on", "off"),
    "train.device": ("auto", "cpu", "cuda"),
    "cluster.launcher": ("local", "mpi", "slurm"),
}


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Read a YAML file, resolving its `include:` list depth-first (includes first)."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    if path in seen:
        raise ConfigError(str(path), "include cycle")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers in their text
        raise ConfigError(str(path), f"cannot parse YAML: {exc}") from None
    includes = raw.pop("include", []) if isinstance(raw, DictConfig) else []
    if isinstance(includes, str):
        includes = [includes]
    parts = [_read_yaml(_resolve_include(path, inc), seen + (path,)) for inc in includes]
    return OmegaConf.merge(*parts, raw) if parts else raw


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
            merged = OmegaConf.merge(merged, _read_yaml(Path(p)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "override must look like key=value")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as exc:  # name the override, not just the innermost field
                key = item.split("=", 1)[0]
                inner = _key_of(exc)
                raise ConfigError(key if inner in key else f"{key}.{inner}", str(exc).splitlines()[0]) from None
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
        d.prepare.inputs = [i if i == "stdlib" else absolute(i) for i in d.prepare.inputs]
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
    run_dir.mkdir(parents=True, exist_ok=True)
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    if not (path.is_file() and path.read_text() == text):
        tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
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
    shape = (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads or m.n_heads, ffn_dim(m), m.tie_embeddings)
    return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]


def ffn_dim(m: ModelConfig) -> int:
    """The SwiGLU hidden size: explicit, or Llama's 8/3 d_model rounded up to multiple_of."""
    if m.ffn_dim is not None:
        return m.ffn_dim
    hidden = int(8 * m.d_model / 3)
    return m.multiple_of * math.ceil(hidden / m.multiple_of)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def validate(cfg: Config) -> None:
    """Check value ranges and cross-field rules that need no world size."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _check(m.d_model % m.n_heads == 0, "model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head dim (d_model / n_heads) must be even for RoPE")
    kv = m.n_kv_heads or m.n_heads
    _check(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads", f"{kv} must divide model.n_heads={m.n_heads}")
    p = cfg.parallel
    for key in ("pp", "dp_replicate", "tp", "pp_virtual_stages"):
        _check(getattr(p, key) >= 1, f"parallel.{key}", "must be >= 1")
    _check(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", "must be >= 1, or -1 for the rest of the world")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    _validate_layout(cfg)
    d = cfg.data
    _check(d.seq_len > 0, "data.seq_len", "must be positive")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    for i, item in enumerate(d.mixture):
        _check(item.weight > 0, f"data.mixture.{i}.weight", f"must be positive, got {item.weight}")
    _check(d.synthetic in (None, "markov"), "data.synthetic", f"{d.synthetic!r} is not one of markov")
    if d.synthetic:
        _check(0 < d.synthetic_vocab <= m.vocab_size, "data.synthetic_vocab",
               f"{d.synthetic_vocab} must be in 1..model.vocab_size={m.vocab_size}")
    else:
        _check(bool(d.path or d.mixture), "data.path", "set data.path (or data.mixture, or data.synthetic=markov)")
    t = cfg.train
    _check(t.steps >= 0, "train.steps", "must be >= 0")
    _check(t.micro_batch >= 1, "train.micro_batch", "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: no evaluation)")
    _check(t.eval_steps >= 1 or t.eval_every == 0, "train.eval_steps", "must be >= 1 when train.eval_every > 0")
    _check(t.global_batch_tokens is None or t.global_batch_tokens > 0, "train.global_batch_tokens", "must be positive")
    _check(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    o = cfg.optim
    _check(o.lr > 0, "optim.lr", "must be positive")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 < o.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction", "must be in (0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


def pipeline_microbatches(cfg: Config) -> int:
    """Micro-batches a pipeline schedule splits each train.micro_batch into (1 without pp)."""
    p = cfg.parallel
    return (p.pp_microbatches or p.pp) if p.pp > 1 else 1


def _validate_layout(cfg: Config) -> None:
    """The layout rules that need no world size: what tensor and pipeline parallelism require of the
    model, the batch and the schedule. `kiln.parallel.check_layout` adds the world-size check."""
    p, m = cfg.parallel, cfg.model
    kv, tp, pp = m.n_kv_heads or m.n_heads, p.tp, p.pp
    _check(m.n_heads % tp == 0, "parallel.tp", f"model.n_heads={m.n_heads} is not divisible by tp={tp}")
    _check(kv % tp == 0, "parallel.tp", f"model.n_kv_heads={kv} is not divisible by tp={tp}")
    _check(ffn_dim(m) % tp == 0, "parallel.tp", f"model ffn_dim={ffn_dim(m)} is not divisible by tp={tp}")
    _check(m.vocab_size % tp == 0, "parallel.tp",
           f"model.vocab_size={m.vocab_size} is not divisible by tp={tp} (vocab-parallel embedding/output)")
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
    if p.engine == "deepspeed":
        _check(tp == 1 and pp == 1, "parallel.engine", "deepspeed supports DP-only layouts (tp=1, pp=1)")
        _check(p.dp_replicate == 1, "parallel.dp_replicate", "deepspeed shards over all DP ranks; leave dp_replicate=1")
        _check(p.init != "sharded", "parallel.init", "sharded initialization needs parallel.engine=native; "
               "DeepSpeed builds the full model on every rank before ZeRO partitions it")


def resolve_world(cfg: Config, world_size: int) -> dict[str, int]:
    """Derive every mesh dim from the config and world size; dp_shard=-1 takes the rest."""
    p = cfg.parallel
    fixed = p.pp * p.dp_replicate * p.tp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        _check(world_size % fixed == 0, "parallel.dp_shard",
               f"world size {world_size} is not divisible by pp*dp_replicate*tp={fixed}")
        dp_shard = world_size // fixed
    _check(fixed * dp_shard == world_size, "parallel",
           f"pp*dp_replicate*dp_shard*tp = {p.pp}*{p.dp_replicate}*{dp_shard}*{p.tp} = {fixed * dp_shard} "
           f"!= world size {world_size}")
    return {"pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "tp": p.tp}


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    """Micro-steps per optimizer step so that a step sees train.global_batch_tokens tokens."""
    per_micro = cfg.train.micro_batch * cfg.data.seq_len * dp_size
    target = cfg.train.global_batch_tokens
    if target is None:
        return 1
    _check(target % per_micro == 0, "train.global_batch_tokens",
           f"{target} is not a multiple of micro_batch*seq_len*dp = {per_micro}")
    return target // per_micro


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
