"""What users see: one copy of rank-repeated warnings, generate's header and newline, complete --help."""
from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import logging, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
from kiln.metrics import quiet_other_ranks
rank = int(sys.argv[1])
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
quiet_other_ranks(rank)
mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
w = distribute_tensor(torch.randn(8, 8), mesh, [Shard(0), Shard(1)])
torch.nn.utils.get_total_norm([w], 2.0).full_tensor()   # FSDP x TP gradient-norm reduction
"""


def test_norm_partial_warning_is_printed_by_rank_0_only():
    # torch's real warning, raised by a 2-D mesh's grad-norm reduction (a fake process group of 4
    # stands in for the other ranks): rank 0 prints it, every other rank stays quiet.
    err = {r: subprocess.run([sys.executable, "-c", PROBE, str(r)], capture_output=True, text=True, check=True).stderr
           for r in (0, 1)}
    assert "_NormPartial" in err[0]
    assert "_NormPartial" not in err[1]


def _help_options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _subparser(*path):
    from kiln.cli import build_parser

    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        parser = sub.choices[name]
    return parser


def test_help_of_generate_and_prepare_describes_every_flag_with_its_default():
    for path in (("generate",), ("data", "prepare")):
        parser = _subparser(*path)
        text = " ".join(parser.format_help().split())
        for action in _help_options(parser):
            assert action.help and len(action.help) > 10, (path, action.dest)
            if action.required:
                continue
            if action.default is None or action.default is False:
                # "unset" defaults are explained in words (a flag's default is off)
                assert action.default is False or "default:" in action.help, (path, action.dest)
            else:
                assert f"(default: {action.default})" in text, (path, action.dest)


def test_generate_names_the_checkpoint_and_step_and_ends_with_a_newline(tmp_path, capsys):
    import json

    import torch

    from kiln.checkpoint.kiln_format import write_kiln_checkpoint
    from kiln.cli import main
    from kiln.config import load_config
    from kiln.data.prepare import prepare
    from kiln.data.tokenizer import load_tokenizer
    from kiln.generate import sample
    from kiln.model import Transformer

    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n" * 40)
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "data"), "byte", sample_tokens=32, num_proc=1)
    cfg = load_config([], ["model.vocab_size=257", f"data.path={tmp_path / 'data'}", "data.seq_len=32",
                           "model.max_seq_len=64"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    step_dir = write_kiln_checkpoint(model.state_dict(), cfg, tmp_path / "run", step=37)

    assert main([ "generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert f"loaded {step_dir} (step 37)" in err
    tok = load_tokenizer(str(tmp_path / "data"))
    expected = "def " + tok.decode(sample(model.eval(), tok.encode("def "), 5, eos_id=tok.eos_id))
    assert out == expected + ("" if expected.endswith("\n") else "\n")

    assert main(["generate", str(step_dir), "--prompt", "def ", "--max-new-tokens", "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["step"] == 37 and record["checkpoint"] == str(step_dir) and record["text"] == expected[4:]
