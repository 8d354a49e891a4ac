"""Megatron-Core's `torch_dist` checkpoint format (Megatron-LM's default `--ckpt-format`) <-> kiln.

A `torch_dist` directory (`release/` or `iter_XXXXXXX/`) is a torch.distributed.checkpoint (DCP)
save of *global* tensors, whatever TP x PP wrote it, plus `metadata.json` naming the backend and
`common.pt` (the non-sharded state: Megatron-LM's `args`, or kiln's model settings). The layers are
stacked: `decoder.layers.<param>` has shape [num_layers, ...], and the norms carry the Transformer
Engine names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) for every layer spec.
The fused qkv and [gate; up] tensors are in their TP=1 layout, so no TP split happens here:
megatron-core reshards on load. `_extra_state` entries are one pickled `[None]` per layer (what
the local spec saves). Reading goes through kiln's safe DCP reader (no pickle from the checkpoint
runs) and holds one stacked tensor at a time; writing holds the whole model once, like a kiln save.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import torch

from kiln.convert.names import Source, cast, check_shape, kiln_shapes
from kiln.convert.megatron import (DIST_METADATA, META_KEY, SIDECAR, TRACKER, _checkpoint_dir, _config_from_meta,
                                      _fused_qkv, _load, _meta_from_args, _pad_rows, check_writable, megatron_meta,
                                      split_qkv)
from kiln.errors import KilnError

COMMON = "common.pt"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}
_L = "decoder.layers."
# kiln per-layer name -> (stacked Megatron key, other names the same tensor has in other layer specs)
_STACKED = {
    "attention_norm.weight": (_L + "self_attention.linear_qkv.layer_norm_weight", _L + "input_layernorm.weight"),
    "ffn_norm.weight": (_L + "mlp.linear_fc1.layer_norm_weight", _L + "pre_mlp_layernorm.weight"),
    "attention.wo.weight": (_L + "self_attention.linear_proj.weight",),
    "feed_forward.w2.weight": (_L + "mlp.linear_fc2.weight",),
}
_QKV, _FC1 = _L + "self_attention.linear_qkv.weight", _L + "mlp.linear_fc1.weight"
_EXTRA = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


def is_torch_dist(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DIST_METADATA).is_file()


def write_megatron_dist(source: Source, out: Path, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                        vocab_multiple: int = 128) -> list[str]:
    """Write `source` as a `torch_dist` checkpoint under OUT/release. `tp` only sets the vocab
    padding (a multiple of vocab_multiple * tp), as Megatron-LM does; any TP x PP loads it."""
    import torch.distributed.checkpoint as dcp

    from kiln.checkpoint.kiln_format import _single_process

    m = source.cfg.model
    check_writable(m, tp, pp)
    meta = megatron_meta(m, tp, pp, vocab_multiple)
    shapes = kiln_shapes(m)

    def get(name: str) -> torch.Tensor:
        return cast(check_shape(name, source.get(name), shapes[name], "source"), dtype)

    vocab = meta["padded_vocab_size"]
    state: dict[str, Any] = {"embedding.word_embeddings.weight": _pad_rows(get("tok_embeddings.weight"), vocab)}
    stacks: dict[str, list[torch.Tensor]] = {key[0]: [] for key in _STACKED.values()}
    stacks[_QKV], stacks[_FC1] = [], []
    for i in range(m.n_layers):
        p = f"layers.{i}."
        for part, keys in _STACKED.items():
            stacks[keys[0]].append(get(p + part))
        stacks[_QKV].append(_fused_qkv(get(p + "attention.wq.weight"), get(p + "attention.wk.weight"),
                                       get(p + "attention.wv.weight"), m))
        stacks[_FC1].append(torch.cat([get(p + "feed_forward.w1.weight"), get(p + "feed_forward.w3.weight")]))
    state.update({key: torch.stack(ts) for key, ts in stacks.items()})
    del stacks
    state["decoder.final_layernorm.weight"] = get("norm.weight")
    if not m.tie_embeddings:
        state["output_layer.weight"] = _pad_rows(get("output.weight"), vocab)
    for part in _EXTRA:
        for i in range(m.n_layers):
            buf = io.BytesIO()
            torch.save([None], buf)
            state[f"{_L}{part}._extra_state/shard_{i}_{m.n_layers}"] = buf
    root = out / "release"
    root.mkdir(parents=True, exist_ok=True)
    with _single_process():
        dcp.save(state, checkpoint_id=str(root), no_dist=True)
    torch.save({META_KEY: meta, "checkpoint_version": 3.0, "iteration": 0}, root / COMMON)
    (root / DIST_METADATA).write_text(json.dumps(BACKEND) + "\n")
    (out / TRACKER).write_text("release")
    (out / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
    files = sorted(str(f.relative_to(out)) for f in root.iterdir())
    return files + [TRACKER, SIDECAR]


class MegatronDistSource:
    """A `torch_dist` checkpoint read through kiln names, one stacked tensor in memory at a time."""

    def __init__(self, path: Path):
        from kiln.checkpoint.safe_load import read_dcp_metadata

        self.path = Path(path)
        self.dir = _checkpoint_dir(self.path)
        try:
            backend = json.loads((self.dir / DIST_METADATA).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KilnError(f"{self.dir / DIST_METADATA}: cannot read ({exc})") from None
        if backend.get("sharded_backend") != "torch_dist":
            raise KilnError(f"{self.dir / DIST_METADATA}: sharded_backend {backend.get('sharded_backend')!r} is not "
                            f"supported (kiln reads torch_dist and the legacy torch format)")
        self.tensors = {k: md for k, md in read_dcp_metadata(self.dir).state_dict_metadata.items()
                        if hasattr(md, "chunks")}
        self.meta = self._read_meta()
        self.cfg = _config_from_meta(self.meta, str(self.path))
        self.shapes = kiln_shapes(self.cfg.model)
        unknown = [k for k in self.tensors if not (k in ("embedding.word_embeddings.weight", "output_layer.weight",
                                                         "decoder.final_layernorm.weight", _QKV, _FC1)
                                                   or any(k in keys for keys in _STACKED.values()))]
        if unknown:
            raise KilnError(f"{self.dir}: tensor {unknown[0]} has no kiln counterpart "
                            f"(biases, learned positions, MoE and optimizer states are not supported)")
        self._cached: tuple[str, torch.Tensor] | None = None

    def _read_meta(self) -> dict[str, Any]:
        common = _load(self.dir / COMMON) if (self.dir / COMMON).is_file() else {}
        if isinstance(common.get(META_KEY), dict):
            return common[META_KEY]
        if common.get("args") is not None:
            return _meta_from_args(common["args"], self.dir / COMMON)
        for candidate in (self.path / SIDECAR, self.dir.parent / SIDECAR):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise KilnError(f"{self.dir / COMMON}: no model settings (neither kiln metadata nor Megatron-LM args)")

    def _full(self, *keys: str) -> torch.Tensor:
        """The global tensor under the first of `keys` the checkpoint has (safe DCP load)."""
        from kiln.checkpoint.kiln_format import _single_process
        from kiln.checkpoint.safe_load import dcp_load

        key = next((k for k in keys if k in self.tensors), None)
        if key is None:
            raise KilnError(f"{self.dir}: checkpoint has no tensor {keys[0]}")
        if self._cached is None or self._cached[0] != key:
            md = self.tensors[key]
            state = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
            self._cached = None
            with _single_process():
                dcp_load(state, self.dir)
            self._cached = (key, state[key])
        return self._cached[1]

    def get(self, name: str) -> torch.Tensor:
        return check_shape(name, self._get(name), self.shapes[name], str(self.path))

    def _get(self, name: str) -> torch.Tensor:
        m = self.cfg.model
        if name == "tok_embeddings.weight" or (name == "output.weight" and m.tie_embeddings):
            return self._vocab(self._full("embedding.word_embeddings.weight"), name)
        if name == "output.weight":
            return self._vocab(self._full("output_layer.weight"), name)
        if name == "norm.weight":
            return self._full("decoder.final_layernorm.weight").clone()
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= m.n_layers:
            raise KilnError(f"{self.path}: no Megatron tensor for kiln name {name}")
        i, part = int(parts[1]), parts[2]
        if part in _STACKED:
            return self._layer(self._full(*_STACKED[part]), i, _STACKED[part][0]).clone()
        if part in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"):
            qkv = self._layer(self._full(_QKV), i, _QKV)
            return split_qkv(qkv, m, _QKV, self.meta, str(self.path))[part.split(".")[1]].clone()
        if part in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
            gate, up = torch.chunk(self._layer(self._full(_FC1), i, _FC1), 2, dim=0)
            return (gate if part.startswith("feed_forward.w1") else up).clone()
        raise KilnError(f"{self.path}: no Megatron tensor for kiln name {name}")

    def _layer(self, stacked: torch.Tensor, i: int, key: str) -> torch.Tensor:
        if stacked.shape[0] != self.cfg.model.n_layers:
            raise KilnError(f"{self.dir}: {key} stacks {stacked.shape[0]} layers, the config says "
                            f"{self.cfg.model.n_layers}")
        return stacked[i]

    def _vocab(self, t: torch.Tensor, name: str) -> torch.Tensor:
        vocab = self.cfg.model.vocab_size
        if t.shape[0] < vocab:
            raise KilnError(f"{self.path}: {name} has {t.shape[0]} vocab rows, the config says {vocab}")
        return t[:vocab].clone()


def open_megatron(path: Path) -> Source:
    """The right reader for a Megatron directory: torch_dist or the legacy per-rank files."""
    from kiln.convert.megatron import MegatronSource

    return MegatronDistSource(path) if is_torch_dist(_checkpoint_dir(Path(path))) else MegatronSource(path)
