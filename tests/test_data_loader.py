"""The streaming loader: coverage, resume, bad shards, mixtures, validation, document ids.

Oracle: the shards read back with webdataset (an independent tar reader). Samples are random
letters, so every stored sample is unique and can be recognised in the batches.
"""
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from kiln.config import DataConfig, DatasetSource
from kiln.data.loader import shard_loader
from kiln.data.prepare import prepare
from kiln.errors import KilnError

os.environ.setdefault("OMP_NUM_THREADS", "1")
EOS = 256  # byte tokenizer
L = 64  # tokens per stored sample
SEQ = 31  # windows of 32 tokens: exactly two per sample


def _make(tmp_path: Path, name: str, alphabet: str = "abcdefghij \n", n_docs: int = 48, val: float = 0.0,
          seed: int = 0) -> str:
    rng = random.Random(seed)
    src = tmp_path / f"{name}.jsonl"
    with open(src, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(10, 200)))}) + "\n")
    out = tmp_path / name
    prepare([str(src)], str(out), "byte", samples_per_shard=5, val_fraction=val, sample_tokens=L, num_proc=1)
    return str(out)


def _oracle_samples(path: str, split: str = "train") -> list[tuple]:
    names = sorted(Path(path).glob(f"{split}-*.tar"))
    ds = wds.WebDataset([str(n) for n in names], shardshuffle=False)
    return [tuple(np.frombuffer(s["tokens"], dtype=np.uint16).tolist()) for s in ds]


def _windows(batch) -> np.ndarray:
    """Rebuild the seq_len+1 windows from input and target."""
    return torch.cat([batch["input"], batch["target"][:, -1:]], dim=1).numpy()


def _cfg(path=None, **kw) -> DataConfig:
    return DataConfig(path=path, seq_len=SEQ, num_workers=kw.pop("num_workers", 2), shuffle_buffer=kw.pop("buf", 4),
                      seed=kw.pop("seed", 7), **kw)


def _take(loader, n):
    return [b for _, b in zip(range(n), loader)]


def _global(per_rank: list[list]) -> list:
    """Batches of all ranks in global order: rank r's i-th batch is global batch i*n + r."""
    return [batch for step in zip(*per_rank) for batch in step]


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys))


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    path = _make(tmp_path, "ds")
    oracle = _oracle_samples(path)
    n = len(oracle)
    assert len(set(oracle)) == n and n >= 20
    per_rank = []
    for rank in range(2):
        loader = shard_loader(_cfg(path), split="train", micro_batch=2, dp_rank=rank, dp_size=2, vocab_size=257)
        per_rank.append(_take(loader, n))  # micro_batch 2 x 32-token windows = one 64-token sample per batch
        assert loader.state_dict()["epochs"] == [2] and loader.state_dict()["windows"] == 4 * n
    samples = [tuple(_windows(b).reshape(-1).tolist()) for b in _global(per_rank)]
    epochs = samples[:n], samples[n:]
    for e, seen in enumerate(epochs):
        assert sorted(seen) == sorted(oracle), f"epoch {e} is not an exact cover"
    for rank in range(2):  # each rank gets its share of every epoch, disjoint from the other's
        mine = set(samples[rank::2][: n // 2])
        assert len(mine) == n // 2 and not mine & set(samples[1 - rank::2][: n // 2])
    assert epochs[0] != epochs[1], "epochs should be shuffled differently"
    assert list(epochs[0]) != oracle, "train order should be shuffled"


@pytest.mark.parametrize("buf", [1, 3])
def test_shuffle_permutes_shards_then_samples_within_blocks(tmp_path, buf):
    path = _make(tmp_path, "ds")
    oracle = _oracle_samples(path)
    n, per_shard = len(oracle), 5
    loader = shard_loader(_cfg(path, num_workers=0, buf=buf), split="train", micro_batch=2, dp_rank=0, dp_size=1,
                          vocab_size=257)
    index = {x: i for i, x in enumerate(oracle)}
    epoch = [index[tuple(_windows(b).reshape(-1).tolist())] for b in _take(loader, n)]
    assert sorted(epoch) == list(range(n))
    shards = sorted(range(0, n, per_shard), key=lambda s: min(epoch.index(i) for i in range(s, min(s + per_shard, n))))
    assert shards != sorted(shards), "shard order should be permuted"
    unshuffled = [i for s in shards for i in range(s, min(s + per_shard, n))]  # segments in the epoch's order
    for b in range(0, n, buf):  # each block holds exactly its positions of the segment order
        assert sorted(epoch[b:b + buf]) == sorted(unshuffled[b:b + buf])
    assert (epoch == unshuffled) == (buf == 1)


def test_global_stream_is_the_same_for_any_dp_size_and_micro_batch(tmp_path):
    a = _make(tmp_path, "a")
    cfg = _cfg(None, num_workers=0, document_mask=True,
               mixture=[DatasetSource(a, 2.0), DatasetSource(_make(tmp_path, "b", "xyz", seed=1), 1.0)])
    kw = dict(split="train", vocab_size=257)
    single = _take(shard_loader(cfg, micro_batch=2, dp_rank=0, dp_size=1, **kw), 24)
    three = _global([_take(shard_loader(cfg, micro_batch=2, dp_rank=r, dp_size=3, **kw), 8) for r in range(3)])
    assert _same(single, three)
    wide = _take(shard_loader(cfg, micro_batch=6, dp_rank=0, dp_size=1, **kw), 8)
    rows = lambda bs: {k: torch.cat([b[k] for b in bs]) for k in bs[0]}
    assert _same([rows(single)], [rows(wide)])


@pytest.mark.parametrize("mixture,document_mask", [(False, False), (True, True)])
def test_resume_sees_the_uninterrupted_batches_with_any_worker_count(tmp_path, mixture, document_mask):
    a = _make(tmp_path, "a")
    cfg = _cfg(a, document_mask=document_mask)
    if mixture:
        cfg.path, cfg.mixture = None, [DatasetSource(a, 2.0), DatasetSource(_make(tmp_path, "b", "xyz", seed=1), 1.0)]
    kw = dict(split="train", micro_batch=3, dp_rank=1, dp_size=2, vocab_size=257)
    full = _take(shard_loader(cfg, **kw), 40)  # several epochs
    k = 13
    first = shard_loader(cfg, **kw)
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    for workers in (0, 1, 3):
        cfg.num_workers = workers
        resumed = shard_loader(cfg, **kw)
        resumed.load_state_dict(state)
        rest = _take(resumed, 40 - k)
        for i, (x, y) in enumerate(zip(full[k:], rest)):
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), f"batch {k + i} {key} differs with {workers} workers"
    assert set(full[0]) == ({"input", "target", "doc_ids"} if document_mask else {"input", "target"})


def test_batches_have_the_contract_shapes_and_target_is_shifted_input(tmp_path):
    path = _make(tmp_path, "ds")
    batch = _take(shard_loader(_cfg(path, num_workers=0), split="train", micro_batch=4, dp_rank=0, dp_size=1,
                               vocab_size=300), 1)[0]
    assert batch["input"].shape == batch["target"].shape == (4, SEQ)
    assert batch["input"].dtype == batch["target"].dtype == torch.int64
    assert torch.equal(batch["input"][:, 1:], batch["target"][:, :-1])


def test_validation_is_one_unshuffled_pass_with_equal_batches_per_rank(tmp_path):
    path = _make(tmp_path, "ds", n_docs=120, val=0.3)
    oracle = np.concatenate([np.array(s) for s in _oracle_samples(path, "val")])
    per_rank = []
    for rank in range(2):
        loader = shard_loader(_cfg(path, document_mask=True), split="val", micro_batch=2, dp_rank=rank, dp_size=2,
                              vocab_size=257)
        passes = [list(loader), list(loader)]
        assert len(passes[0]) == len(passes[1]) == len(loader) > 0
        assert _same(*passes)
        for b in passes[0]:  # unshuffled: a new document starts exactly after each EOS
            ids, inp = b["doc_ids"].numpy(), b["input"].numpy()
            expect = np.concatenate([np.zeros((len(inp), 1), int), np.cumsum(inp[:, :-1] == EOS, axis=1)], axis=1)
            assert np.array_equal(ids, expect)
        per_rank.append(passes[0])
    assert len(per_rank[0]) == len(per_rank[1])
    stream = np.concatenate([_windows(b).reshape(-1) for b in _global(per_rank)])  # interleaved = manifest order
    assert np.array_equal(stream, oracle[: len(stream)])
    assert len(oracle) - len(stream) < 2 * 2 * (SEQ + 1), "only the tail short of one batch per rank is unused"


def test_doc_ids_split_at_eos_and_at_shuffled_sample_joins(tmp_path):
    path = _make(tmp_path, "ds")
    seq, batch_size = 40, 3  # 41-token windows straddle the 64-token samples
    cfg = _cfg(path, num_workers=2, document_mask=True)
    cfg.seq_len = seq
    loader = shard_loader(cfg, split="train", micro_batch=batch_size, dp_rank=0, dp_size=1, vocab_size=257)
    batches = _take(loader, 20)
    windows = np.concatenate([torch.cat([b["input"], b["target"][:, -1:]], 1).numpy() for b in batches])
    stream = windows.reshape(-1)
    position = {s: i for i, s in enumerate(_oracle_samples(path))}
    index = [position[tuple(x)] for x in stream[: len(stream) // L * L].reshape(-1, L).tolist()]
    joins = {j * L for j in range(1, len(index)) if index[j] != index[j - 1] + 1}
    assert joins, "the shuffled order should join unrelated samples"
    doc_ids = np.concatenate([b["doc_ids"].numpy() for b in batches])
    checked = 0
    for w, (row, ids) in enumerate(zip(windows, doc_ids)):
        g = w * (seq + 1)
        if g + seq >= len(index) * L:
            break
        expect = [s for s in range(1, seq) if row[s - 1] == EOS or (g + s) in joins]
        assert ids[0] == 0 and list(np.flatnonzero(np.diff(ids)) + 1) == expect
        assert set(np.diff(ids).tolist()) <= {0, 1}
        checked += bool(expect)
    assert checked > 10


def test_mixture_proportions_match_weights(tmp_path):
    a, b = _make(tmp_path, "a", "abc"), _make(tmp_path, "b", "xyz", seed=3)
    cfg = _cfg(None, num_workers=0, mixture=[DatasetSource(a, 3.0), DatasetSource(b, 1.0)])
    loader = shard_loader(cfg, split="train", micro_batch=16, dp_rank=0, dp_size=1, vocab_size=257)
    counts = Counter()
    for batch in _take(loader, 200):
        for row in _windows(batch):
            letters = set(row.tolist()) - {EOS, 10, 32}
            assert letters <= set(b"abc") or letters <= set(b"xyz"), "a window mixes datasets"
            counts["a" if letters <= set(b"abc") else "b"] += 1
    n = sum(counts.values())
    p = counts["a"] / n
    assert abs(p - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, counts
    state = loader.state_dict()
    assert sum(state["consumed"]) == n == state["windows"]


def _entry(path, split="train", i=1):
    return json.loads((Path(path) / "manifest.json").read_text())["splits"][split]["shards"][i]["name"]


@pytest.mark.parametrize("damage,failing_ranks", [("flip-data", {1}), ("flip-header", {0, 1}),
                                                   ("truncate", {0, 1}), ("missing", {0, 1})])
def test_bad_shard_fails_naming_it_or_is_skipped_by_every_rank(tmp_path, damage, failing_ranks, caplog):
    """Shard 1 is damaged. Under `fail` every rank checks structure and rank 1 (1 mod 2) hashes it, so
    a bit flip in token bytes fails there; under `skip` both ranks drop it and agree on the stream."""
    path = _make(tmp_path, "ds")
    name = _entry(path)
    shard = Path(path) / name
    keep = _oracle_samples(path)
    raw = bytearray(shard.read_bytes())
    if damage == "flip-data":
        raw[512 + 5] ^= 0xFF  # a token of the first member
        shard.write_bytes(bytes(raw))
    elif damage == "flip-header":
        raw[1024 + 5] ^= 0xFF  # the second member's name
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        shard.unlink()
    kw = dict(split="train", micro_batch=2, dp_size=2, vocab_size=257)
    for rank in range(2):
        if rank in failing_ranks:
            with pytest.raises(KilnError, match=name):
                shard_loader(_cfg(path), dp_rank=rank, **kw)
        else:
            shard_loader(_cfg(path), dp_rank=rank, **kw)
    per_rank = []
    for rank in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kiln.data"):
            per_rank.append(_take(shard_loader(_cfg(path, on_bad_shard="skip"), dp_rank=rank, **kw), len(keep)))
        assert "skipped 1 bad shard" in caplog.text and name in caplog.text
    lost = set(keep[5:10])  # shard 1 holds samples 5..9
    seen = [tuple(_windows(b).reshape(-1).tolist()) for b in _global(per_rank)][: len(keep) - 5]
    assert sorted(seen) == sorted(set(keep) - lost)


def test_manifest_vocab_larger_than_model_is_refused(tmp_path):
    path = _make(tmp_path, "ds")
    with pytest.raises(KilnError, match="manifest.json.*vocab_size 257 > model.vocab_size=200"):
        shard_loader(_cfg(path), split="train", micro_batch=2, dp_rank=0, dp_size=1, vocab_size=200)


def test_mixture_with_different_tokenizers_is_refused(tmp_path):
    a = _make(tmp_path, "a")
    src = tmp_path / "a.jsonl"
    prepare([str(src)], str(tmp_path / "bpe"), "bpe:300", sample_tokens=L, num_proc=1, val_fraction=0)
    cfg = _cfg(None, mixture=[DatasetSource(a, 1), DatasetSource(str(tmp_path / "bpe"), 1)])
    with pytest.raises(KilnError, match="a mixture needs one tokenizer"):
        shard_loader(cfg, split="train", micro_batch=2, dp_rank=0, dp_size=1, vocab_size=512)


def test_too_little_data_gives_clear_errors(tmp_path):
    path = _make(tmp_path, "ds", n_docs=3, val=0.3)
    m = json.loads((Path(path) / "manifest.json").read_text())
    samples = m["splits"]["train"]["samples"]
    # More ranks than samples is fine: ranks share one global stream, not the samples.
    got = [_windows(_take(shard_loader(_cfg(path, num_workers=0), split="train", micro_batch=2, dp_rank=r,
                                       dp_size=samples + 1, vocab_size=257), 1)[0]) for r in range(samples + 1)]
    assert {tuple(w.reshape(-1, L)[0]) for w in got[:samples]} == set(_oracle_samples(path))
    with pytest.raises(KilnError, match="validation split too small.*dp_size"):
        shard_loader(_cfg(path), split="val", micro_batch=64, dp_rank=0, dp_size=1, vocab_size=257)
    with pytest.raises(KilnError, match="split 'val' has no samples"):
        shard_loader(_cfg(_make(tmp_path, "noval")), split="val", micro_batch=2, dp_rank=0, dp_size=1, vocab_size=257)
    with pytest.raises(KilnError, match="data.path"):
        shard_loader(_cfg(None), split="train", micro_batch=2, dp_rank=0, dp_size=1, vocab_size=257)


def test_more_workers_than_shards_still_yields_in_order(tmp_path):
    path = _make(tmp_path, "ds", n_docs=8)
    assert len(json.loads((Path(path) / "manifest.json").read_text())["splits"]["train"]["shards"]) < 4
    ref = _take(shard_loader(_cfg(path, num_workers=0), split="train", micro_batch=2, dp_rank=0, dp_size=1,
                             vocab_size=257), 12)
    got = _take(shard_loader(_cfg(path, num_workers=4), split="train", micro_batch=2, dp_rank=0, dp_size=1,
                             vocab_size=257), 12)
    assert all(torch.equal(x["input"], y["input"]) for x, y in zip(ref, got))


def _run_ranks(cfg, dp_size, batches, state=None, micro_batch=2):
    """Each rank of `dp_size` takes `batches` micro-batches, resuming from the old ranks' saved `state`."""
    loaders = [shard_loader(cfg, split="train", micro_batch=micro_batch, dp_rank=r, dp_size=dp_size, vocab_size=257)
               for r in range(dp_size)]
    if state is not None:
        for r, loader in enumerate(loaders):
            loader.load_state_dict(loader.remap_state(state, r, dp_size))
    taken = [_take(loader, batches) for loader in loaders]
    return taken, {str(r): json.loads(json.dumps(lo.state_dict())) for r, lo in enumerate(loaders)}


def _step_windows(per_rank, accum):
    """Per optimizer step (accum micro-batches on every rank), the sorted multiset of its windows."""
    steps = []
    for s in range(len(per_rank[0]) // accum):
        rows = [tuple(w) for batches in per_rank for b in batches[s * accum:(s + 1) * accum] for w in _windows(b).tolist()]
        steps.append(sorted(rows))
    return steps


def test_dp2_to_dp4_resume_loses_and_repeats_no_window(tmp_path):
    """Fixed tokens per step: DP=2 x accum 2 for 3 steps, then DP=4 x accum 1 for 5 steps, must consume
    per step exactly the windows of an uninterrupted DP=2 run (and of a DP=1 run, in global order)."""
    a = _make(tmp_path, "a")
    cfg = _cfg(None, num_workers=1, document_mask=True,
               mixture=[DatasetSource(a, 2.0), DatasetSource(_make(tmp_path, "b", "xyz", seed=1), 1.0)])
    steps, k = 8, 3
    full, _ = _run_ranks(cfg, 2, 2 * steps)
    first, saved = _run_ranks(cfg, 2, 2 * k)
    assert len({json.dumps({**st, "dp_rank": 0}) for st in saved.values()}) == 1, "the state is global"
    assert saved["0"]["windows"] == k * 4 * 2
    second, after = _run_ranks(cfg, 4, steps - k, state=saved)
    assert _step_windows(first, 2) + _step_windows(second, 1) == _step_windows(full, 2)
    single, end = _run_ranks(cfg, 1, 4 * steps)
    assert _same(single[0], _global(first) + _global(second)) and _same(single[0], _global(full))
    assert {s["windows"] for s in after.values()} == {end["0"]["windows"]}
    assert {tuple(s["consumed"]) for s in after.values()} == {tuple(end["0"]["consumed"])}
    back, _ = _run_ranks(cfg, 1, 4 * (steps - k), state=saved)  # DP=2 -> DP=1 too
    assert _same(back[0], single[0][4 * k:])


def test_dp_change_that_would_split_a_micro_batch_is_refused(tmp_path):
    from kiln.data.loader import remap_data_state

    path = _make(tmp_path, "ds")
    _, saved = _run_ranks(_cfg(path, num_workers=0), 2, 3)  # 6 global batches of 2 windows
    with pytest.raises(KilnError, match="12 windows consumed .*dp_size=4 x micro_batch=2"):
        remap_data_state(saved, 0, 4)
    loader = shard_loader(_cfg(path), split="train", micro_batch=4, dp_rank=0, dp_size=2, vocab_size=257)
    with pytest.raises(KilnError, match="cannot be split over dp_size=2 x micro_batch=4"):
        loader.load_state_dict(loader.remap_state(saved, 0, 2))
    assert remap_data_state(saved, 2, 3)["dp_rank"] == 2
    with pytest.raises(KilnError, match="seq_len"):
        loader.load_state_dict({**saved["0"], "seq_len": 99})
    with pytest.raises(KilnError, match="disagree"):
        remap_data_state({"0": saved["0"], "1": {**saved["1"], "windows": 14}}, 0, 1)
    with pytest.raises(KilnError, match="v2 train state"):
        loader.load_state_dict({**saved["0"], "version": 1})
