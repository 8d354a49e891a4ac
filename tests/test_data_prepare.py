"""`kiln data prepare`: inputs, tokenizers, shards and manifest checked against independent readers."""
import argparse
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from kiln.config import DataConfig, PrepareConfig
from kiln.data import commands
from kiln.data.prepare import ensure_prepared, prepare
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError


def _docs(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ijkl\n") for _ in range(rng.randint(20, 300))) for _ in range(n)]


def _write_inputs(tmp_path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(60)
    (tmp_path / "a.txt").write_text(docs[0])
    with open(tmp_path / "b.jsonl", "w") as fh:
        for d in docs[1:30]:
            fh.write(json.dumps({"body": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": docs[30:]}), tmp_path / "c.parquet")
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")], docs


def _stream(out: Path, split: str, dtype) -> np.ndarray:
    """All tokens of a split, read with webdataset (an independent tar reader)."""
    names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    if not names:
        return np.zeros(0, dtype=dtype)
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False, empty_check=False)
    return np.concatenate([np.frombuffer(s["tokens"], dtype=dtype) for s in ds])


def test_all_input_kinds_roundtrip_through_byte_shards(tmp_path):
    inputs, docs = _write_inputs(tmp_path)
    m = prepare(inputs, str(tmp_path / "out"), "byte", text_field="body", samples_per_shard=5,
                val_fraction=0.0, sample_tokens=32, num_proc=1)
    expected = np.concatenate([np.r_[list(d.encode()), 256] for d in docs]).astype(np.uint16)
    got = _stream(tmp_path / "out", "train", np.uint16)
    assert len(got) == len(expected) // 32 * 32
    assert np.array_equal(got, expected[: len(got)])
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and m["totals"]["documents"] == 60
    assert m["totals"]["tokens_encoded"] == len(expected)
    for entry in m["splits"]["train"]["shards"]:
        raw = (tmp_path / "out" / entry["name"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"]
    assert sum(e["samples"] for e in m["splits"]["train"]["shards"]) == len(got) // 32
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def test_prepare_is_byte_identical_across_runs_and_process_counts(tmp_path):
    inputs, _ = _write_inputs(tmp_path)
    kw = dict(text_field="body", samples_per_shard=4, val_fraction=0.1, sample_tokens=16)
    prepare(inputs, str(tmp_path / "one"), "bpe:300", num_proc=1, **kw)
    prepare(inputs, str(tmp_path / "two"), "bpe:300", num_proc=2, **kw)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert any(n.startswith("val-") for n in names) and "tokenizer.json" in names
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n


def test_bpe_tokenizer_is_stored_and_decodes_the_shards(tmp_path):
    inputs, docs = _write_inputs(tmp_path)
    m = prepare(inputs, str(tmp_path / "out"), "bpe:300", text_field="body", val_fraction=0.0,
                sample_tokens=16, num_proc=1)
    tok = load_tokenizer(str(tmp_path / "out"))
    assert tok.vocab_size == m["vocab_size"] <= 300 and tok.eos_id == m["tokenizer"]["eos_id"]
    assert tok.decode(tok.encode(docs[3])) == docs[3]
    tokens = _stream(tmp_path / "out", "train", np.uint16).tolist()
    first_doc = tokens[: tokens.index(tok.eos_id)]
    assert tok.decode(first_doc) == docs[0]


def test_val_split_follows_the_requested_fraction(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(400, seed=1)))
    m = prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), "byte", val_fraction=0.2,
                sample_tokens=16, num_proc=1)
    frac = m["splits"]["val"]["tokens"] / m["totals"]["tokens"]
    assert 0.17 < frac < 0.23
    cut = m["totals"]["documents_cut"]  # a document cut in two counts in both splits
    assert m["splits"]["val"]["documents"] + m["splits"]["train"]["documents"] == 400 + cut


def test_non_utf8_text_is_replaced_and_counted(tmp_path):
    (tmp_path / "ok.txt").write_text("plain text " * 10)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes " * 10)
    m = prepare([str(tmp_path / "*.txt")], str(tmp_path / "out"), "byte", val_fraction=0.0, sample_tokens=8,
                num_proc=1)
    assert m["totals"]["non_utf8_documents"] == 1
    text = load_tokenizer(str(tmp_path / "out")).decode(_stream(tmp_path / "out", "train", np.uint16).tolist())
    assert "caf\ufffd latin-1" in text


@pytest.mark.parametrize("case", ["nomatch", "empty", "field", "column", "tiny", "tokenizer"])
def test_bad_inputs_give_one_clear_error(tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "f.jsonl").write_text('{"text": "hi"}\n{"other": "x"}\n')
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    (tmp_path / "tiny.txt").write_text("ab")
    inputs, match, tok = {
        "nomatch": ([str(tmp_path / "nope*.txt")], "matches no files", "byte"),
        "empty": ([str(tmp_path / "empty.txt")], "contain no text", "byte"),
        "field": ([str(tmp_path / "f.jsonl")], "f.jsonl:2", "byte"),
        "column": ([str(tmp_path / "p.parquet")], "no column 'text'", "byte"),
        "tiny": ([str(tmp_path / "tiny.txt")], "fewer than one sample", "byte"),
        "tokenizer": ([str(tmp_path / "tiny.txt")], "not 'byte'", "missing.json"),
    }[case]
    with pytest.raises(KilnError, match=match):
        prepare(inputs, str(tmp_path / "out"), tok, num_proc=1)
    assert not (tmp_path / "out").exists()


def test_ensure_prepared_builds_stdlib_once(tmp_path):
    path = tmp_path / "stdlib-data"
    cfg = DataConfig(path=str(path), prepare=PrepareConfig(inputs=["stdlib"], tokenizer="byte",
                                                           max_bytes=200_000, sample_tokens=256))
    ensure_prepared(cfg)
    m = json.loads((path / "manifest.json").read_text())
    assert 200_000 <= m["totals"]["bytes"] < 2_000_000 and m["inputs"] == ["stdlib"]
    stamp = (path / "manifest.json").stat().st_mtime_ns
    ensure_prepared(cfg)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    assert "def " in load_tokenizer(str(path)).decode(_stream(path, "train", np.uint16)[:5000].tolist())


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kiln")
    commands.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare_json_and_inspect(tmp_path, capsys):
    inputs, docs = _write_inputs(tmp_path)
    out = str(tmp_path / "out")
    assert _cli(["data", "prepare", *inputs, "--out", out, "--text-field", "body", "--json", "--num-proc", "1",
                 "--sample-tokens", "64", "--val-fraction", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["totals"]["documents"] == 60
    assert _cli(["data", "inspect", out, "--verify", "--samples", "1"]) == 0
    text = capsys.readouterr().out
    assert "byte" in text and "verified" in text and docs[0][:20] in text
    with pytest.raises(KilnError, match="no manifest.json"):
        _cli(["data", "inspect", str(tmp_path)])
