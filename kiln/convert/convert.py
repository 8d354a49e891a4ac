"""`kiln convert`: detect the source format, read it through kiln names, write the target.

Every reader presents the checkpoint as full kiln-named tensors fetched one at a time and every
writer consumes them in state-dict order, so any source converts to any target and only the
kiln target (a DCP save of the whole model) holds all weights at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kiln.checkpoint.kiln_format import KilnCheckpointReader, is_kiln_checkpoint, write_kiln_checkpoint
from kiln.convert.names import Source, cast, iter_checked
from kiln.errors import KilnError

TARGETS = ("kiln", "hf", "megatron")

__all__ = ["convert", "detect_format", "open_source", "write_kiln", "write_kiln_checkpoint"]


def detect_format(src: Path) -> str:
    """Which checkpoint format lives at `src` (a directory)."""
    from kiln.convert import deepspeed, hf, megatron

    src = Path(src)
    if not src.exists():
        raise KilnError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise KilnError(f"{src}: expected a checkpoint directory")
    if hf.is_hf_dir(src):
        return "hf"
    if megatron.is_megatron_dir(src):
        return "megatron"
    if deepspeed.is_deepspeed_dir(src):
        return "deepspeed"
    if is_kiln_checkpoint(src):
        return "kiln"
    if any(src.glob("*.bin")) or any(src.glob("*.pt")) or any(src.glob("*.pth")):
        raise KilnError(f"{src}: holds only pickled weights (.bin/.pt); kiln reads Hugging Face weights from "
                        f"safetensors, which cannot run code: save the model with safe_serialization=True first")
    raise KilnError(f"{src}: not a kiln, Hugging Face, Megatron or DeepSpeed checkpoint")


def open_source(src: Path, fmt: Optional[str] = None) -> Source:
    from kiln.convert import deepspeed, hf

    fmt = fmt or detect_format(src)
    if fmt == "hf":
        return hf.HFSource(src)
    if fmt == "megatron":
        from kiln.convert.megatron_dist import open_megatron

        return open_megatron(src)
    if fmt == "deepspeed":
        return deepspeed.DeepSpeedSource(src)
    return KilnCheckpointReader(src)


def write_kiln(source: Source, out: Path, dtype: Optional[str] = None) -> Path:
    """The whole model as a kiln checkpoint at step 0 (tied output shares the embedding)."""
    state: dict[str, torch.Tensor] = {}
    for name, t in iter_checked(source, "source checkpoint"):
        if name == "output.weight" and source.cfg.model.tie_embeddings:
            state[name] = state["tok_embeddings.weight"]
        else:
            state[name] = cast(t, dtype).clone()
    step_dir = write_kiln_checkpoint(state, source.cfg, out)
    from kiln.convert import hf

    if isinstance(source, hf.HFSource):
        hf.save_extras(source, out)
    return step_dir


def _count_reads(source: Source):
    """A progress bar (tensors read, rate, ETA) on a terminal: a 70B conversion takes minutes."""
    from tqdm import tqdm

    from kiln.convert.names import kiln_shapes

    bar = tqdm(total=len(kiln_shapes(source.cfg.model)), unit="tensor", desc="convert", disable=None)
    get = source.get

    def counted(name: str) -> torch.Tensor:
        t = get(name)
        bar.update(1)
        return t

    source.get = counted
    return bar


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"--out {out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)


def refuse_unexportable(m, to: str) -> None:
    """Model variants that Hugging Face Llama and Megatron-Core GPT cannot express: converting them
    would write weights whose logits differ silently, so refuse with the key to blame."""
    target = "Hugging Face Llama" if to == "hf" else "Megatron-Core GPT"
    if m.position != "rope":
        raise KilnError(f"--to {to}: model.position={m.position} has no {target} equivalent (it uses RoPE); "
                        f"keep this checkpoint in kiln's format")
    if m.moe is not None and to != "hf":
        raise KilnError(f"--to {to}: model.moe: MoE models convert to Hugging Face Mixtral (--to hf) or kiln, "
                        f"not to {target} (kiln writes its dense layout only)")
    if m.attention_pattern is not None and m.attention_pattern.kind != "dense":
        raise KilnError(f"--to {to}: model.attention_pattern.kind={m.attention_pattern.kind} has no {target} "
                        f"equivalent (dense causal attention); keep this checkpoint in kiln's format")


def convert(src: str | Path, to: str, out: str | Path, *, tp: int = 1, pp: int = 1, fmt: Optional[str] = None,
            max_shard_size: str | int = "5GB", dtype: Optional[str] = None, vocab_multiple: int = 128,
            megatron_format: str = "torch") -> dict:
    """Convert `src` to format `to` under `out`; returns a summary (source format, files)."""
    from kiln.convert import hf, megatron

    if to not in TARGETS:
        raise KilnError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    src, out = Path(src), Path(out)
    fmt = fmt or detect_format(src)
    if megatron_format not in ("torch", "torch_dist"):
        raise KilnError(f"--megatron-format {megatron_format!r} is not one of torch, torch_dist")
    if to != "megatron" and (tp, pp) != (1, 1):
        raise KilnError("--tp/--pp select a Megatron layout; they need --to megatron")
    source = open_source(src, fmt)
    if to != "kiln":
        refuse_unexportable(source.cfg.model, to)
    _prepare_out(out)
    bar = _count_reads(source)
    if to == "hf":
        files = hf.write_hf(source, out, max_shard_size=max_shard_size, dtype=dtype)
    elif to == "megatron" and megatron_format == "torch_dist":
        from kiln.convert.megatron_dist import write_megatron_dist

        files = write_megatron_dist(source, out, tp=tp, pp=pp, dtype=dtype, vocab_multiple=vocab_multiple)
    elif to == "megatron":
        files = megatron.write_megatron(source, out, tp=tp, pp=pp, dtype=dtype, vocab_multiple=vocab_multiple)
    else:
        step_dir = write_kiln(source, out, dtype)
        files = [str(step_dir.relative_to(out))]
    bar.close()
    return {"source": str(src), "source_format": fmt, "target": to, "out": str(out), "files": files,
            "model": {"d_model": source.cfg.model.d_model, "n_layers": source.cfg.model.n_layers,
                      "vocab_size": source.cfg.model.vocab_size}}
