"""The train/validation split: by tokens, within 1.5x the requested fraction, for any number of documents."""
from __future__ import annotations

import random

import numpy as np
import pytest
import webdataset as wds

from kiln.data.prepare import _Splitter, prepare

EOS = 256


def _stream(out, split):
    names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False, empty_check=False)
    return np.concatenate([np.frombuffer(s["tokens"], dtype=np.uint16) for s in ds]) if names else np.zeros(0, np.uint16)


def _pieces(tokens: list[int]) -> list[bytes]:
    """Byte-tokenizer stream -> the texts between EOS tokens."""
    return [bytes(p) for p in _split_at(tokens, EOS)]


def _split_at(tokens, sep):
    out, cur = [], []
    for t in tokens:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out  # the unterminated rest (sample-tail truncation) is not a piece


def _text(rng, n):
    return "".join(rng.choice("abcdefgh ijkl\n") for _ in range(n))


def test_few_large_files_split_by_tokens_and_reassemble(tmp_path):
    rng = random.Random(0)
    docs = [_text(rng, n) for n in (60_000, 25_000, 15_000)]  # the first used to go to validation whole
    inputs = []
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
        inputs.append(str(tmp_path / f"{i}.txt"))
    m = prepare(inputs, str(tmp_path / "out"), "byte", val_fraction=0.01, sample_tokens=16, num_proc=1)
    frac = m["splits"]["val"]["tokens"] / m["totals"]["tokens"]
    assert 0.01 / 1.5 <= frac <= 0.01 * 1.5
    # Independent check with webdataset: every document is its train head + its validation tail.
    train = _stream(tmp_path / "out", "train").tolist()
    val = _stream(tmp_path / "out", "val").tolist()
    heads, tails = _pieces(train), _pieces(val)
    assert m["totals"]["documents_cut"] == 3
    # each split's last piece may lose its end (and EOS) to the partial last sample
    assert len(heads) >= 2 and len(tails) >= 2
    for h, t, d in zip(heads, tails, docs):
        assert h + t == d.encode() and len(t) > 0


def test_one_document_corpus_has_both_splits(tmp_path):
    (tmp_path / "one.txt").write_text(_text(random.Random(1), 50_000))
    m = prepare([str(tmp_path / "one.txt")], str(tmp_path / "out"), "byte", val_fraction=0.01,
                sample_tokens=64, num_proc=2)
    assert m["splits"]["train"]["samples"] > 0 and m["splits"]["val"]["samples"] > 0
    frac = m["splits"]["val"]["tokens"] / m["totals"]["tokens"]
    assert 0.01 / 1.5 <= frac <= 0.01 * 1.5


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("corpus", ["many-small", "few-large", "mixed", "one"])
def test_split_stays_within_1_5x_of_the_fraction(fraction, corpus):
    rng = np.random.default_rng(hash((corpus, fraction)) % 2**32)
    lengths = {
        "many-small": rng.integers(20, 400, 5000),
        "few-large": rng.integers(50_000, 400_000, 4),
        "mixed": np.concatenate([rng.integers(20, 2000, 500), [300_000], rng.integers(20, 2000, 500)]),
        "one": np.asarray([500_000]),
    }[corpus]
    ids = np.arange(int(lengths.sum()), dtype=np.uint32) % 250
    split = _Splitter(fraction, EOS, min_piece=512)
    train, val = split(ids, lengths)
    assert len(train) + len(val) == len(ids) + split.cut  # nothing lost; one EOS per cut
    total = len(train) + len(val)
    assert fraction / 1.5 <= len(val) / total <= fraction * 1.5, (len(val) / total)
    if corpus == "many-small":
        assert split.cut < 0.01 * len(lengths)  # many documents: split by documents
