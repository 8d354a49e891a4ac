"""Layout validation (clear ConfigError naming the key, before any process group) and the
pipeline split (layer balance, FQNs kept, ends on the right stages). No processes spawned."""
from __future__ import annotations

import pytest
import torch

from kiln.distributed import parallel_dims
from kiln.errors import ConfigError
from kiln.model.llama import Transformer
from kiln.parallel.pipeline import layers_per_stage, split_stage, stage_indices

from test_parallel_support import make_cfg


@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.tp=2", "parallel.pp=2"], 6, "parallel.dp_shard"),
    (["parallel.tp=2", "parallel.dp_shard=2"], 8, "parallel"),
    (["model.vocab_size=129", "parallel.tp=2"], 2, "parallel.tp"),
    (["model.ffn_dim=102", "parallel.tp=4", "model.n_kv_heads=4"], 4, "parallel.tp"),
    (["data.seq_len=15", "parallel.tp=2"], 2, "data.seq_len"),
    (["train.micro_batch=3", "parallel.pp=2"], 2, "parallel.pp_microbatches"),
    (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_virtual_stages=2"], 2,
     "parallel.pp_virtual_stages"),
    (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_microbatches=3",
      "train.micro_batch=3"], 2, "parallel.pp_microbatches"),
    (["model.tie_embeddings=true", "parallel.pp=2"], 2, "model.tie_embeddings"),
    (["parallel.engine=deepspeed", "parallel.dp_replicate=2"], 2, "parallel.dp_replicate"),
    (["train.global_batch_tokens=100"], 2, "train.global_batch_tokens"),  # caught at launch, not in workers
])
def test_bad_layout_names_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as err:  # at load time, or (world size) when the layout is resolved
        parallel_dims(make_cfg(overrides), world)
    assert err.value.key == key


@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=8"], "parallel.tp"),                                    # 4 heads
    (["parallel.pp=4", "parallel.pp_virtual_stages=2"], "parallel.pp"),     # 4 layers < 8 stages
    (["parallel.engine=deepspeed", "parallel.tp=2"], "parallel.engine"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=0", "parallel.offload_optimizer=true"],
     "parallel.offload_optimizer"),
    (["parallel.pp_schedule=looped"], "parallel.pp_schedule"),
    (["model.attention=flash2"], "model.attention"),
])
def test_config_level_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        make_cfg(overrides)
    assert key in str(err.value)


def test_every_declared_schedule_has_a_torch_class():
    from torch.distributed import pipelining

    from kiln.config import PP_SCHEDULES
    from kiln.parallel.pipeline import SCHEDULES

    assert set(SCHEDULES) == set(PP_SCHEDULES)
    assert all(hasattr(pipelining.schedules, cls) for cls in SCHEDULES.values())


def test_good_layout_resolves_dims():
    dims = parallel_dims(make_cfg(["parallel.pp=2", "parallel.tp=2", "parallel.dp_replicate=2"]), 16)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 2, 2, 2, 4)
    assert dims.microbatches == 2 and dims.world_size == 16


def test_layer_balance():
    assert layers_per_stage(8, 4) == [2, 2, 2, 2]
    assert layers_per_stage(6, 4) == [1, 2, 2, 1]     # extra layers to the middle stages
    assert layers_per_stage(5, 2) == [3, 2]
    assert sum(layers_per_stage(33, 8)) == 33
    assert stage_indices(1, 2, 2) == [1, 3]


def test_split_keeps_names_and_ends():
    cfg = make_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    full = dict(model.named_parameters())
    parts = [split_stage(model, s, 4) for s in range(4)]
    seen = {}
    for s, part in enumerate(parts):
        assert (part.tok_embeddings is not None) == (s == 0)
        assert (part.output is not None) == (s == 3) and (part.norm is not None) == (s == 3)
        for name, p in part.named_parameters():
            assert name not in seen
            seen[name] = p
    assert set(seen) == set(full)
    assert all(torch.equal(seen[n], full[n]) for n in full)
    # Chained stages compute the full model.
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    h = tokens
    for part in parts:
        h = part(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)
