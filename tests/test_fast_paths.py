"""Which fast paths kiln turns on by itself: per-block torch.compile (`parallel.compile=auto`) and
fused AdamW (`optim.fused=auto`), per device type. CPU-only: compile is lazy, so a model on CPU can
be prepared "for CUDA" and inspected without running it."""
from __future__ import annotations

import pytest
import torch

from kiln.config import load_config, to_yaml, from_yaml_text
from kiln.errors import ConfigError
from kiln.model import Transformer
from kiln.optim import build_optimizer, fused_adamw
from kiln.parallel.parallelize import compile_enabled, parallelize

TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=8",
        "model.max_seq_len=16", "data.synthetic=markov", "data.synthetic_vocab=16"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("mode, device, expected", [
    ("auto", CUDA, True), ("auto", CPU, False),
    (True, CPU, True), (True, CUDA, True), (False, CUDA, False), (False, CPU, False),
])
def test_compile_choice(mode, device, expected):
    assert compile_enabled(mode, device) is expected


@pytest.mark.parametrize("mode, device, distributed, expected", [
    ("auto", CUDA, False, True), ("auto", CUDA, True, True),  # CUDA has fused kernels for DTensor shards too
    ("auto", CPU, False, True), ("auto", CPU, True, False),   # CPU: fused for plain tensors, foreach for shards
    (True, CPU, True, True), (False, CUDA, False, False),
])
def test_fused_adamw_choice(mode, device, distributed, expected):
    assert fused_adamw(mode, device, distributed) is expected


@pytest.mark.parametrize("text, value", [("on", True), ("off", False), ("true", True), ("false", False), ("auto", "auto")])
def test_fused_reads_yaml_on_off(text, value, tmp_path):
    """YAML reads on/off as booleans; `optim.fused: off` once failed to load ("'False' is not one of")."""
    from kiln.config import load_config

    assert load_config([], ["data.synthetic=markov", f"optim.fused={text}"]).optim.fused == value
    (tmp_path / "c.yaml").write_text(f"optim:\n  fused: {text}\n")
    assert load_config([tmp_path / "c.yaml"], ["data.synthetic=markov"]).optim.fused == value


def test_fused_names_its_choices_as_yaml_spells_them():
    from kiln.config import load_config
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.fused.*'maybe' is not one of auto, true, false"):
        load_config([], ["data.synthetic=markov", "optim.fused=maybe"])


@pytest.mark.parametrize("override, expected", [
    ([], "auto"), (["parallel.compile=true"], True), (["parallel.compile=false"], False),
    (["parallel.compile=on"], True), (["parallel.compile=auto"], "auto"),
])
def test_compile_config_values(override, expected):
    cfg = load_config([], TINY + override)
    assert cfg.parallel.compile == expected and type(cfg.parallel.compile) is type(expected)
    assert from_yaml_text(to_yaml(cfg)).parallel.compile == expected, "the saved run config keeps the choice"


@pytest.mark.parametrize("value", ["fast", "1", "'true'", "[1]"])
def test_compile_bad_values_name_the_key(value):
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config([], TINY + [f"parallel.compile={value}"])


@pytest.mark.parametrize("device, compiled", [(CUDA, True), (CPU, False)])
def test_auto_compiles_blocks_only_on_cuda(device, compiled):
    cfg = load_config([], TINY)
    model = parallelize(Transformer(cfg.model), None, cfg, device)
    assert [b._compiled_call_impl is not None for b in model.layers.values()] == [compiled] * 2


def test_default_optimizer_on_cpu_is_fused_single_process_and_foreach_sharded():
    cfg = load_config([], TINY)
    model = Transformer(cfg.model)
    assert build_optimizer(model, cfg.optim, CPU, distributed=False).defaults["fused"] is True
    assert not build_optimizer(model, cfg.optim, CPU, distributed=True).defaults["fused"]


def test_attention_backend_choice_compiles_without_a_graph_break():
    """torch.compile reads the flash-attn probe as a constant (an lru_cache there made Dynamo trace
    the import inside every compiled attention call)."""
    from kiln.model.attention import flash_attn_module, resolve_backend

    flash_attn_module()

    def scale(x):
        return x * (2 if resolve_backend("auto", CUDA, torch.bfloat16) == "sdpa" else 3)

    compiled = torch.compile(scale, backend="eager", fullgraph=True)
    assert float(compiled(torch.ones(1))) == (2.0 if flash_attn_module() is None else 3.0)
