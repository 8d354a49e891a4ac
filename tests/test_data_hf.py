"""Hugging Face inputs for `kiln data prepare`: saved datasets, arrow files, the local datasets cache by
name (offline), and transformers tokenizer directories; checked against the libraries' own readers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from kiln.data.prepare import prepare
from kiln.errors import KilnError

datasets = pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parent.parent
DOCS = [f"def f{i}(x):\n    return x * {i}  # é\n" * (1 + i % 3) for i in range(40)]


def _stream(out: Path, split: str = "train") -> np.ndarray:
    names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False, empty_check=False)
    return np.concatenate([np.frombuffer(s["tokens"], dtype=np.uint16) for s in ds])


def _expected_bytes(docs) -> np.ndarray:
    return np.concatenate([np.r_[list(d.encode()), 256] for d in docs]).astype(np.uint16)


def _check_byte_roundtrip(out: Path, docs) -> None:
    got, expected = _stream(out), _expected_bytes(docs)
    assert len(got) == len(expected) // 16 * 16 and np.array_equal(got, expected[: len(got)])


def test_saved_dataset_dict_and_arrow_files(tmp_path):
    ds = datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(10)), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    kw = dict(text_field="content", val_fraction=0.0, sample_tokens=16, num_proc=1)

    prepare([str(tmp_path / "saved")], str(tmp_path / "a"), "byte", **kw)
    _check_byte_roundtrip(tmp_path / "a", DOCS)
    m = prepare([str(tmp_path / "dict")], str(tmp_path / "b"), "byte", **kw)  # a DatasetDict: its train split
    assert m["totals"]["documents"] == 10
    _check_byte_roundtrip(tmp_path / "b", DOCS[:10])
    arrows = sorted((tmp_path / "saved").glob("*.arrow"))
    prepare([str(a) for a in arrows], str(tmp_path / "c"), "byte", **kw)
    _check_byte_roundtrip(tmp_path / "c", DOCS)

    with pytest.raises(KilnError, match="no column 'text'.*content"):
        prepare([str(tmp_path / "saved")], str(tmp_path / "d"), "byte", val_fraction=0.0, num_proc=1)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(KilnError, match="without a 'train' split"):
        prepare([str(tmp_path / "notrain")], str(tmp_path / "e"), "byte", **kw)


def _cache_dataset(cache: Path, name: str, docs) -> None:
    """Put `name` into a datasets cache the way load_dataset(name) leaves a Hub dataset there."""
    from datasets.packaged_modules.json.json import Json

    src = cache.parent / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    builder = Json(cache_dir=str(cache), dataset_name=name, data_files={"train": [str(src)]}, hash="0123abcd")
    builder.download_and_prepare()
    (config_dir,) = (cache / name).glob("default-*")  # Hub datasets' config dir is the config name
    config_dir.rename(cache / name / "default")


def test_dataset_in_the_local_cache_by_name_offline(tmp_path):
    cache = tmp_path / "hf-cache"
    _cache_dataset(cache, "kiln_tiny_corpus", DOCS)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "kiln.cli", "data", "prepare", "hf:kiln_tiny_corpus", "--out",
                          str(tmp_path / "out"), "--val-fraction", "0", "--sample-tokens", "16", "--num-proc", "1",
                          "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["inputs"] == ["hf:kiln_tiny_corpus"]
    _check_byte_roundtrip(tmp_path / "out", DOCS)
    missing = subprocess.run([sys.executable, "-m", "kiln.cli", "data", "prepare", "hf:kiln_not_cached", "--out",
                              str(tmp_path / "none")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "hf:kiln_not_cached" in missing.stderr and "Traceback" not in missing.stderr


def _hf_tokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    # An EOS name kiln's by-name search does not know: it must come from the tokenizer's own config.
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|doc_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(DOCS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|doc_end|>", pad_token="<pad>")


def test_transformers_tokenizer_directory_and_tokenizer_json(tmp_path):
    from kiln.data.tokenizer import load_tokenizer

    tok = _hf_tokenizer(tmp_path)
    tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    m = prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), str(tmp_path / "tok"), val_fraction=0.0,
                sample_tokens=16, num_proc=2)
    eos = tok.convert_tokens_to_ids("<|doc_end|>")
    assert m["tokenizer"]["eos_id"] == eos and m["vocab_size"] == len(tok)
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [eos] for d in DOCS]).astype(np.uint16)
    got = _stream(tmp_path / "out")
    assert np.array_equal(got, expected[: len(got)]) and len(got) == len(expected) // 16 * 16
    assert load_tokenizer(str(tmp_path / "out")).decode(tok(DOCS[1], add_special_tokens=False)["input_ids"]) == DOCS[1]

    # the tokenizer.json alone: EOS from the tokenizer_config.json beside it, the same tokens
    m2 = prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out2"), str(tmp_path / "tok" / "tokenizer.json"),
                 val_fraction=0.0, sample_tokens=16, num_proc=1)
    assert m2["tokenizer"]["eos_id"] == eos and np.array_equal(_stream(tmp_path / "out2"), got)
    (tmp_path / "tok" / "tokenizer_config.json").unlink()  # and without it: no EOS by any known name
    with pytest.raises(KilnError, match="no end-of-document token"):
        prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out3"), str(tmp_path / "tok" / "tokenizer.json"),
                val_fraction=0.0, sample_tokens=16, num_proc=1)
