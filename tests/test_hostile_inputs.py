"""Hostile and careless inputs, as tables: planted pickles in every format kiln reads, damaged
`latest` pointers, flipped and truncated checkpoint parts, out-of-range token ids and manifests,
run names that leave runs/, full and read-only disks, config values at and beyond their ranges,
and resumes that ignore what the user asked. Every case must end in one line naming the culprit
(exit 2, no traceback), lose no good checkpoint, and run no code from a file."""
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from kiln.checkpoint.safe_load import read_dcp_metadata

TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64",
        "data.synthetic=markov", "logging.tensorboard=false", "logging.progress=false", "train.eval_every=0",
        "data.seq_len=16", "train.micro_batch=2", "logging.log_every=1", "checkpoint.every=2",
        "checkpoint.keep_last=3"]


@pytest.fixture(autouse=True, scope="module")
def _in_process_workers():
    """`kiln train` ends a worker with os._exit (the gloo exit cure); in-process it must return."""
    import kiln.distributed as bootstrap

    real, bootstrap.shutdown = bootstrap.shutdown, lambda *a, **k: None
    yield
    bootstrap.shutdown = real


def kiln(capsys, *argv):
    """Run the CLI in-process; (exit code, stdout, stderr). Any exception but a KilnError fails the test."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kiln: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, _in_process_workers):
    """A run with whole checkpoints at steps 2, 4 and 6 (latest = 6)."""
    root = tmp_path_factory.mktemp("base")
    assert main(["train", *TINY, f"train.run_dir={root}", "train.name=run", "train.steps=6"]) == 0
    return root / "run"


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the base run, with its config pointing at the copy."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def train_args(run_dir: Path, *extra):
    return ["train", *TINY, f"train.run_dir={run_dir.parent}", f"train.name={run_dir.name}", *extra]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def reseal(step_dir: Path) -> None:
    """Recompute meta.json's sizes and sums: an attacker who can write the files can write these too."""
    meta = json.loads((step_dir / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = (step_dir / name).stat().st_size
        meta["sha256"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    (step_dir / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- 1. no code from any file kiln reads

class Payload:
    """Unpickling this touches the marker file (os.system through __reduce__)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def dotted_global_pickle(marker: Path) -> bytes:
    """A protocol-4 pickle that resolves `os.system` as an attribute path through a DCP module."""
    module, name = b"torch.distributed.checkpoint.metadata", b"os.system"
    cmd = f"touch {marker}".encode()
    return (b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name
            + b"\x93" + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")


def _bytes_item(step_dir: Path):
    md = read_dcp_metadata(step_dir)
    index, info = next((i, v) for i, v in md.storage_data.items() if i.fqn.startswith("optim.param_groups"))
    return md, index, info


def plant_bytes_item(step_dir: Path, marker: Path) -> None:
    """Overwrite a pickled optimizer item inside __0_0.distcp in place (same file size)."""
    _, _, info = _bytes_item(step_dir)
    payload = pickle.dumps(Payload(marker))
    assert len(payload) <= info.length
    path = step_dir / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset:info.offset + info.length] = payload.ljust(info.length, b".")
    path.write_bytes(bytes(data))


def plant_model_key_as_bytes(step_dir: Path, marker: Path) -> None:
    """Declare a model weight as a pickled item whose storage is the payload."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md, _, info = _bytes_item(step_dir)
    plant_bytes_item(step_dir, marker)
    key = "model.tok_embeddings.weight"
    md.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in md.storage_data if i.fqn == key]:
        del md.storage_data[index]
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md.storage_data[MetadataIndex(key)] = info
    (step_dir / ".metadata").write_bytes(pickle.dumps(md))


def plant_metadata(step_dir: Path, marker: Path, how: str) -> None:
    if how == "plain":
        data = pickle.dumps(Payload(marker))
    elif how == "dotted":
        data = dotted_global_pickle(marker)
    else:  # a storage entry that reads a file outside the checkpoint
        md = read_dcp_metadata(step_dir)
        for info in md.storage_data.values():
            info.relative_path = "../../../../etc/hostname"
        data = pickle.dumps(md)
    (step_dir / ".metadata").write_bytes(data)


PLANTS = {
    "bytes item in .distcp": lambda d, m: plant_bytes_item(d, m),
    "model key declared as bytes": plant_model_key_as_bytes,
    ".metadata plain pickle": lambda d, m: plant_metadata(d, m, "plain"),
    ".metadata dotted global": lambda d, m: plant_metadata(d, m, "dotted"),
    ".metadata path escape": lambda d, m: plant_metadata(d, m, "escape"),
}


def _verb_args(verb: str, run_dir: Path, tmp_path: Path) -> list:
    if verb == "resume":
        return train_args(run_dir, "train.steps=8")
    if verb == "generate":
        return ["generate", run_dir, "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    if verb == "convert":
        return ["convert", run_dir, "--to", "hf", "--out", tmp_path / "hf"]
    return train_args(tmp_path / "other", "train.steps=1", f"checkpoint.init_from={run_dir}")  # init_from


@pytest.mark.parametrize("sealed", [False, True], ids=["sums-stale", "resealed"])
@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize("verb", ["resume", "generate", "convert", "init_from"])
def test_planted_dcp_pickle_never_runs(run, tmp_path, capsys, plant, verb, sealed):
    marker = tmp_path / "pwned"
    only = ckpt(run, 6)
    for step in (2, 4):  # the planted checkpoint is the only one: no fallback can hide a load
        shutil.rmtree(ckpt(run, step))
    PLANTS[plant](only, marker)
    if sealed:
        reseal(only)
    rc, _, err = kiln(capsys, *_verb_args(verb, run, tmp_path))
    assert not marker.exists(), f"{plant} ran code on {verb}"
    if sealed and plant == "bytes item in .distcp" and verb != "resume":
        assert rc == 0  # model-only readers never touch the optimizer's pickled items
        return
    assert rc == 2
    one_line_error(err, str(only))


def test_bytes_items_still_load_after_hardening(run, capsys):
    """The optimizer's param_groups are pickled items: a clean resume must still read them."""
    rc, out, _ = kiln(capsys, *train_args(run, "train.steps=8"))
    assert rc == 0 and "resumed from" in out and "step_00000006" in out


@pytest.mark.parametrize("kind", ["deepspeed", "megatron", "hf-bin"])
def test_planted_pickle_in_foreign_checkpoint_never_runs(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    payload = pickle.dumps(Payload(marker))
    if kind == "deepspeed":
        (src / "global_step1").mkdir(parents=True)
        (src / "latest").write_text("global_step1")
        (src / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(payload)
        from kiln.config import load_config, to_yaml

        (src / "global_step1" / "config.yaml").write_text(to_yaml(load_config([], TINY)))
        culprit = "mp_rank_00_model_states.pt"
    elif kind == "megatron":
        (src / "release" / "mp_rank_00").mkdir(parents=True)
        (src / "latest_checkpointed_iteration.txt").write_text("release")
        buf = io.BytesIO()
        torch.save({"args": Payload(marker)}, buf)
        (src / "release" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(buf.getvalue())
        culprit = "model_optim_rng.pt"
    else:
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (src / "pytorch_model.bin").write_bytes(payload)
        culprit = "safetensors"
    rc, _, err = kiln(capsys, "convert", src, "--to", "kiln", "--out", tmp_path / "out")
    assert not marker.exists()
    assert rc == 2
    one_line_error(err, culprit)


def test_megatron_tracker_cannot_leave_its_directory(tmp_path, capsys):
    (tmp_path / "outside" / "mp_rank_00").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "latest_checkpointed_iteration.txt").write_text("../outside")
    rc, _, err = kiln(capsys, "convert", src, "--to", "kiln", "--out", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "latest_checkpointed_iteration.txt", "not a directory inside")


def test_deepspeed_latest_tag_cannot_leave_its_directory(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mp_rank_00_model_states.pt").write_bytes(b"x")
    src = tmp_path / "src"
    src.mkdir()
    (src / "latest").write_text("../outside")
    rc, _, err = kiln(capsys, "convert", src, "--to", "kiln", "--out", tmp_path / "out")
    assert rc == 2 and "outside" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 2. a damaged `latest` loses nothing

LATEST = {
    "garbage": b"hello world\n",
    "empty": b"",
    "binary": bytes(range(256)),
    "dotdot": b"..\n",
    "parent escape": b"../../elsewhere/step_00000006\n",
    "absolute": b"/tmp/step_00000006\n",
    "missing step": b"step_00000099\n",
    "newline only": b"\n\n",
}


@pytest.mark.parametrize("content", list(LATEST))
def test_damaged_latest_resumes_from_newest_whole_and_prunes_nothing_newer(run, capsys, content):
    (run / "checkpoints" / "latest").write_bytes(LATEST[content])
    rc, out, _ = kiln(capsys, *train_args(run, "train.steps=8"))
    assert rc == 0
    assert "resumed from" in out and "step_00000006" in out  # not a restart at step 0
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_00000004", "step_00000006", "step_00000008"]  # keep_last=3: only step 2 pruned


def test_restart_from_older_step_never_prunes_newer_checkpoints(run, capsys):
    """`latest` names step 2 (a user pointed it back): the run continues from 2 and 4, 6 survive."""
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    rc, out, _ = kiln(capsys, *train_args(run, "train.steps=4"))
    assert rc == 0 and "step_00000002" in out
    assert {p.name for p in (run / "checkpoints").glob("step_*")} >= {"step_00000004", "step_00000006"}


def test_checkpoints_present_but_none_whole_refuses_instead_of_restarting(run, capsys):
    for step in (2, 4, 6):
        (ckpt(run, step) / "meta.json").write_text("[]")
    rc, _, err = kiln(capsys, *train_args(run, "train.steps=8"))
    assert rc == 2
    one_line_error(err, "no checkpoint there is whole")
    assert all((ckpt(run, s) / "meta.json").read_text() == "[]" for s in (2, 4, 6))


# ---------------------------------------------------------------- 3. integrity: damaged parts are named

def _flip_tensor_byte(step_dir: Path) -> str:
    md = read_dcp_metadata(step_dir)
    index, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == "model.output.weight")
    path = step_dir / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length - 100] ^= 0x40
    path.write_bytes(bytes(data))
    return info.relative_path


def _rewrite(name: str, content: bytes):
    def damage(step_dir: Path) -> str:
        (step_dir / name).write_bytes(content)
        return name
    return damage


def _flip_first_byte(name: str):
    def damage(step_dir: Path) -> str:
        path = step_dir / name
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        return name
    return damage


DAMAGE = {
    "flipped tensor byte": _flip_tensor_byte,
    "flipped .metadata byte": _flip_first_byte(".metadata"),
    "flipped .distcp header": _flip_first_byte("__0_0.distcp"),
    "meta.json is []": _rewrite("meta.json", b"[]"),
    "meta.json not UTF-8": _rewrite("meta.json", b"\xff\xfe{\x00"),
    "meta.json wrong types": _rewrite("meta.json", json.dumps({"step": "six", "files": []}).encode()),
    "meta.json part outside": _rewrite("meta.json", json.dumps({"step": 6, "files": {"../../x": 1}}).encode()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_part_is_named_and_resume_falls_back(run, capsys, caplog, damage):
    culprit = DAMAGE[damage](ckpt(run, 6))
    rc, out, _ = kiln(capsys, *train_args(run, "train.steps=8"))
    assert rc == 0 and "step_00000004" in out.split("resumed from")[1].splitlines()[0]
    warned = " ".join(r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage())
    assert "step_00000006" in warned and (culprit in warned or "meta.json" in warned), warned


@pytest.mark.parametrize("damage", ["flipped tensor byte", "meta.json is []"])
def test_damaged_newest_is_skipped_by_generate_and_convert(run, tmp_path, capsys, damage):
    DAMAGE[damage](ckpt(run, 6))
    rc, _, _ = kiln(capsys, "generate", run, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert rc == 0
    rc, _, _ = kiln(capsys, "convert", run, "--to", "kiln", "--out", tmp_path / "k")
    assert rc == 0
    from kiln.checkpoint.kiln_format import KilnCheckpointReader

    name = "layers.0.attention.wq.weight"
    converted = KilnCheckpointReader(tmp_path / "k").get(name)
    assert torch.equal(converted, KilnCheckpointReader(ckpt(run, 4)).get(name))


def test_a_flipped_byte_in_the_only_checkpoint_is_refused_by_name(run, capsys):
    for step in (2, 4):
        shutil.rmtree(ckpt(run, step))
    name = _flip_tensor_byte(ckpt(run, 6))
    rc, _, err = kiln(capsys, "generate", ckpt(run, 6), "--prompt-ids", "1", "--max-new-tokens", "1")
    assert rc == 2
    one_line_error(err, name, "sha256")


# ---------------------------------------------------------------- 4. token ids and manifests

@pytest.fixture(scope="module")
def shards(tmp_path_factory, _in_process_workers):
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    assert main(["data", "prepare", str(root / "a.txt"), "--out", str(root / "byte"), "--tokenizer", "byte",
                 "--val-fraction", "0", "--sample-tokens", "64"]) == 0
    return root / "byte"


def _shard_args(data: Path, tmp_path: Path, *extra):
    return ["train", *[a for a in TINY if not a.startswith(("data.synthetic", "model.vocab_size"))],
            f"data.path={data}", "model.vocab_size=320", f"train.run_dir={tmp_path}", "train.steps=1", *extra]


def _edit_manifest(data: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(data, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _first_shard(m):
    return m["splits"]["train"]["shards"][0]


def _lying_vocab(m, keep_max=True):
    """A manifest that claims a smaller vocabulary than its shards use (eos moved inside it)."""
    m.update(vocab_size=100)  # the text's letters are ASCII 101..122
    m["tokenizer"]["eos_id"] = 5
    if not keep_max:
        for shard in m["splits"]["train"]["shards"]:
            shard.pop("max_token_id")


MANIFESTS = {
    "vocab below token ids": (_lying_vocab, "train-000000.tar"),
    "eos beyond vocab": (lambda m: m.update(vocab_size=100), "eos_id"),
    "model vocab below manifest": (None, "model.vocab_size=128"),
    "missing dtype": (lambda m: m.pop("dtype"), "dtype"),
    "dtype object": (lambda m: m.update(dtype="object"), "dtype"),
    "splits a list": (lambda m: m.update(splits=[]), "splits"),
    "shard name escapes": (lambda m: _first_shard(m).update(name="../../etc/passwd"), "../../etc/passwd"),
    "samples a string": (lambda m: _first_shard(m).update(samples="many"), "samples"),
    "tokenizer missing eos": (lambda m: m["tokenizer"].pop("eos_id"), "eos_id"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_bad_manifest_or_token_ids_are_one_line(shards, tmp_path, capsys, case):
    edit, culprit = MANIFESTS[case]
    data = _edit_manifest(shards, tmp_path, edit) if edit else shards
    extra = ["model.vocab_size=128"] if edit is None else []
    rc, _, err = kiln(capsys, *_shard_args(data, tmp_path, *extra))
    assert rc == 2
    one_line_error(err, culprit)


def test_old_manifest_without_max_token_id_is_scanned(shards, tmp_path, capsys):
    data = _edit_manifest(shards, tmp_path, lambda m: _lying_vocab(m, keep_max=False))
    rc, _, err = kiln(capsys, *_shard_args(data, tmp_path, "model.vocab_size=110"))
    assert rc == 2
    one_line_error(err, "train-000000.tar", "token id")


# ---------------------------------------------------------------- 5. run directory containment and disks

def test_stale_tmp_from_a_failed_save_is_cleaned_on_start(run, capsys):
    stale = run / "checkpoints" / "step_00000008.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    rc, _, _ = kiln(capsys, *train_args(run, "train.steps=7"))
    assert rc == 0 and not stale.exists()


def _mount(fs_args: list, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *fs_args, str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(base_run, tmp_path, capsys):
    disk = tmp_path / "disk"
    _mount(["-t", "tmpfs", "-o", "size=3m", "tmpfs"], disk)  # one checkpoint is ~0.8 MB
    try:
        shutil.copytree(base_run, disk / "run", ignore=shutil.ignore_patterns("step_00000002", "step_00000004"))
        # fill the disk until the next checkpoint cannot fit
        with open(disk / "filler", "wb") as f:
            free = shutil.disk_usage(disk).free
            f.write(b"\0" * max(free - 150_000, 0))
        rc, _, err = kiln(capsys, *train_args(disk / "run", "train.steps=8"))
        assert rc == 2
        one_line_error(err, "cannot write checkpoint", "No space left on device", "MiB free")
        assert (disk / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
        assert not list((disk / "run" / "checkpoints").glob("*.tmp"))
        (disk / "filler").unlink()
        rc, out, _ = kiln(capsys, *train_args(disk / "run", "train.steps=8"))
        assert rc == 0 and "step_00000006" in out
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_read_only_run_directory_is_one_line(base_run, tmp_path, capsys):
    src, ro = tmp_path / "src", tmp_path / "ro"
    shutil.copytree(base_run, src / "run")
    _mount(["--bind", str(src)], ro)
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)]).returncode != 0:
            pytest.skip("cannot remount read-only here")
        rc, _, err = kiln(capsys, *train_args(ro / "run", "train.steps=8"))
        assert rc == 2
        one_line_error(err, str(ro / "run"), "Read-only file system")
        rc, _, err = kiln(capsys, *train_args(ro / "new", "train.steps=1"))
        assert rc == 2
        one_line_error(err, "train.run_dir", "Read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(ro)])


# ---------------------------------------------------------------- 6. config values: one line, key named

CONFIG = {
    "model.d_model=1e11": "model.d_model", "model.d_model=100000000000": "model.d_model",
    "optim.beta1=2": "optim.beta1", "optim.beta1=1": "optim.beta1", "optim.eps=-1": "optim.eps",
    "model.multiple_of=0": "model.multiple_of", "data.seed=-1": "data.seed",
    "model.init_std=-1": "model.init_std", "model.init_std=nan": "model.init_std", "optim.lr=inf": "optim.lr",
    "optim.lr=0": "optim.lr", "model.rope_theta=0": "model.rope_theta", "model.rope_theta=-5": "model.rope_theta",
    "model.norm_eps=nan": "model.norm_eps", "optim.weight_decay=-0.1": "optim.weight_decay",
    "model.n_kv_heads=0": "model.n_kv_heads", "train.max_time_s=-1": "train.max_time_s",
    "data.shuffle_buffer=-1": "data.shuffle_buffer", "train.name=" + "x" * 5000: "train.name",
    "train.name=${oc.env:HOME}": "train.name", "train.name=../../x": "train.name", "train.name=.": "train.name",
    "train.name=/abs": "train.name", "train.name=`rm -rf ~`": "train.name", "train.name=@x": "train.name",
    "train.name={{x}}": "train.name", "model.attention=fast": "model.attention", "parallel.dp_shard=0": "parallel.dp_shard",
    "parallel.zero_stage=4": "parallel.zero_stage", "optim.grad_clip=-1": "optim.grad_clip",
    "data.prepare.val_fraction=2": "data.prepare.val_fraction", "train.steps=-1": "train.steps",
}


@pytest.mark.parametrize("override", list(CONFIG), ids=[k[:40] for k in CONFIG])
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, capsys, override):
    extra = ["data.prepare.inputs=[x]"] if override.startswith("data.prepare") else []
    rc, _, err = kiln(capsys, "train", *TINY, f"train.run_dir={tmp_path}", *extra, override)
    assert rc == 2
    line = one_line_error(err, CONFIG[override])
    assert len(line) < 400
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("text,culprit", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("include: 7\n", "include"),
    ("include: [secret.txt]\n", "secret.txt"),
    ("model: [1, 2\n", "cannot parse YAML at line"),
])
def test_bad_config_file_is_one_line_and_never_echoes_content(tmp_path, capsys, text, culprit):
    (tmp_path / "secret.txt").write_text("password: hunter2 {{\n  : ] x\n")
    (tmp_path / "c.yaml").write_text(text)
    rc, _, err = kiln(capsys, "train", tmp_path / "c.yaml", f"train.run_dir={tmp_path}")
    assert rc == 2
    one_line_error(err, culprit)
    assert "hunter2" not in err


# ---------------------------------------------------------------- 8. resumes that ignore what the user asked

@pytest.mark.parametrize("override,said", [
    ("train.steps=3", "train.steps=3 is below the step"),
    ("optim.lr=0.01", "optim.lr 0.003 -> 0.01"),
    ("optim.decay=linear", "optim.decay cosine -> linear"),
    ("train.micro_batch=4", "tokens per step 32 -> 64"),
    ("data.seq_len=8", "data.seq_len 16 -> 8"),
])
def test_resume_with_changed_settings_says_what_differs(run, capsys, override, said):
    rc, out, err = kiln(capsys, *train_args(run, "train.steps=8", override))
    assert rc == 2 and "done:" not in out
    one_line_error(err, said, "train.name")


def test_resume_with_changes_allowed_continues(run, capsys):
    rc, out, _ = kiln(capsys, *train_args(run, "train.steps=8", "optim.lr=0.01", "checkpoint.allow_changes=true"))
    assert rc == 0 and "step_00000006" in out and "done: step 8" in out


def test_more_steps_past_warmup_names_the_schedule_jump(tmp_path, capsys):
    args = ["train", *TINY, f"train.run_dir={tmp_path}", "optim.warmup_steps=2"]
    assert kiln(capsys, *args, "train.steps=6")[0] == 0
    rc, _, err = kiln(capsys, *args, "train.steps=12")
    assert rc == 2
    one_line_error(err, "train.steps 6 -> 12 moves the cosine schedule")
    rc, out, _ = kiln(capsys, *args, "train.steps=6", "optim.decay=wsd")
    assert rc == 2  # the decay itself changed
    # WSD interrupted in its stable phase: more steps move nothing at the resume point, so no complaint
    wsd = ["train", *TINY, f"train.run_dir={tmp_path}", "optim.warmup_steps=2", "optim.decay=wsd", "train.name=wsd",
           "checkpoint.keep_last=10"]
    assert kiln(capsys, *wsd, "train.steps=10")[0] == 0
    (tmp_path / "wsd" / "checkpoints" / "latest").write_text("step_00000004\n")
    rc, out, _ = kiln(capsys, *wsd, "train.steps=20")
    assert rc == 0 and "done: step 20" in out


def test_generate_uses_the_tokenizer_the_run_trained_with(shards, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    args = _shard_args(data, tmp_path, "train.name=tok")
    assert kiln(capsys, *args)[0] == 0
    rc, before, _ = kiln(capsys, "generate", tmp_path / "tok", "--prompt", "def ", "--max-new-tokens", "8")
    assert rc == 0
    # the docs' mistake: prepare another corpus with another tokenizer into the same directory
    (tmp_path / "b.txt").write_text("lorem ipsum dolor sit amet " * 300)
    shutil.rmtree(data)
    assert main(["data", "prepare", str(tmp_path / "b.txt"), "--out", str(data), "--tokenizer", "bpe:300",
                 "--val-fraction", "0", "--sample-tokens", "64"]) == 0
    capsys.readouterr()
    rc, after, _ = kiln(capsys, "generate", tmp_path / "tok", "--prompt", "def ", "--max-new-tokens", "8")
    assert rc == 0 and after == before  # the run's own copy, not the new data's tokenizer
    rc, _, _ = kiln(capsys, "convert", tmp_path / "tok", "--to", "hf", "--out", tmp_path / "hf")
    assert rc == 0 and not (tmp_path / "hf" / "tokenizer.json").exists()  # byte-level: not the new BPE
    rc, _, err = kiln(capsys, *_shard_args(data, tmp_path, "train.name=tok", "train.steps=2"))
    assert rc == 2
    one_line_error(err, "is not the one this run trained with")
