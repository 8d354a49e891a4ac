"""`kiln plan` and `kiln estimate` end to end through the CLI."""
import json
import math

import pytest

from kiln.cli import main
from kiln.config import load_config

REQUIRED = ("compute_flops", "params", "tokens", "tokens_per_param", "predicted_loss", "model", "layout",
            "memory_gib_per_gpu", "gpu", "gpus", "mfu", "gpu_hours", "wall_days", "cost_usd", "energy_kwh")


def run_json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_out_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.yaml", tmp_path / "plan.png"
    p = run_json(capsys, "--flops", "1e21", "--gpu", "h100", "--gpus", "8", "--out", str(out), "--plot", str(png))
    for key in REQUIRED:
        assert key in p
    assert set(p["model"]) >= {"n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "seq_len",
                               "params_exact"}
    assert set(p["layout"]) >= {"tp", "pp", "dp", "micro_batch", "grad_accum", "global_batch_tokens"}
    assert p["compute_flops"] == pytest.approx(1e21)
    assert abs(p["params"] / p["params_opt"] - 1) <= 0.03
    assert p["memory_gib_per_gpu"] <= 80e9 * 0.9 / 2**30
    # cost by hand: PaLM FLOPs / (989 TFLOP/s x 41%, Llama 3 on H100) and $3/GPU-hour, 700 W x 1.2
    hours = p["model_flops"] / (989e12 * 0.41) / 3600
    assert p["gpu_hours"] == pytest.approx(hours)
    assert p["wall_days"] == pytest.approx(hours / 8 / 24)
    assert p["cost_usd"] == pytest.approx(3.0 * hours)
    assert p["energy_kwh"] == pytest.approx(hours * 0.7 * 1.2)
    assert png.stat().st_size > 10_000

    cfg = load_config([str(out)])
    lay = p["layout"]
    assert cfg.parallel.tp == lay["tp"] and cfg.parallel.pp == lay["pp"] and cfg.parallel.dp_shard == lay["dp"]
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 8
    assert cfg.train.global_batch_tokens == lay["global_batch_tokens"]
    assert cfg.train.global_batch_tokens % (cfg.train.micro_batch * cfg.data.seq_len * lay["dp"]) == 0
    assert cfg.train.steps == math.ceil(p["tokens"] / lay["global_batch_tokens"])
    assert cfg.model.d_model == p["model"]["d_model"] and cfg.data.seq_len == p["model"]["seq_len"]
    assert cfg.optim.lr == pytest.approx(p["lr"], rel=1e-2)
    assert "--hparams deepseek, DeepSeek LLM 2024" in out.read_text().split("\nmodel:")[0]  # the header names the rule


def test_days_budget_is_spent_in_model_flops(capsys):
    p = run_json(capsys, "--gpu", "h100", "--gpus", "64", "--days", "10")
    assert p["wall_days"] == pytest.approx(10, rel=0.01)


def test_usd_budget(capsys):
    p = run_json(capsys, "--gpu", "a100", "--budget-usd", "50000", "--price-per-gpu-hour", "2")
    assert p["cost_usd"] == pytest.approx(50000, rel=0.01)


def test_fixed_params_and_tokens(capsys):
    p = run_json(capsys, "--params", "1B", "--tokens", "20B")
    assert p["tokens"] == 20e9 and abs(p["params"] / 1e9 - 1) <= 0.03 and p["layout"] is None
    q = run_json(capsys, "--params", "1B")
    assert 15 < q["tokens_per_param"] < 30


def test_compare_lists_all_laws(capsys):
    assert main(["plan", "--flops", "5.76e23", "--compare", "--json"]) == 0
    rows = {r["law"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"chinchilla-1", "chinchilla-2", "chinchilla-3", "epoch", "sardana", "kaplan"}
    assert rows["chinchilla-3"]["params_opt"] == pytest.approx(40e9, rel=0.03)
    assert rows["chinchilla-1"]["predicted_loss"] is None


@pytest.mark.parametrize("argv", [
    ["--flops", "0"], ["--flops=-1e21"], ["--flops", "1e40"], ["--flops", "lots"],
    ["--flops", "1e21", "--gpu", "rtx9090"], ["--flops", "1e21", "--days", "3", "--gpu", "h100", "--gpus", "8"],
    ["--days", "3"], ["--params", "7B", "--tokens", "1T", "--flops", "1e21"], [],
    ["--flops", "1e21", "--gpu", "h100", "--gpus=-4"], ["--flops", "1e21", "--gpu", "h100", "--mfu", "2"],
    ["--flops", "1e21", "--law", "nope"], ["--flops", "1e21", "--out", "x.yaml"],
])
def test_bad_input_one_line_exit_2(argv, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: ")


def test_estimate_fits_and_refuses(tmp_path, capsys):
    # `kiln estimate --measure` measured this layout at a 43.8 GiB peak per GPU (fits in 67.1)
    args = ["configs/model/8b.yaml", "data.synthetic=markov", "data.seq_len=4096", "train.micro_batch=1"]
    assert main(["estimate", *args, "--gpu", "h100", "--gpus", "8", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["fits"] and est["params"] == 8_030_261_248
    assert est["memory_breakdown_gib"]["optimizer"] == pytest.approx(8 * 8_030_261_248 / 8 / 2**30, rel=1e-6)
    assert main(["estimate", "configs/model/70b.yaml", "data.synthetic=markov", "data.seq_len=8192",
                 "--gpu", "h100", "--gpus", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "activations" in err[0]


@pytest.mark.parametrize("extra,rc,says", [
    ([], 0, None),  # 43.7 GiB of 67.1 usable: fits with the margin, nothing to say
    (["data.seq_len=6144"], 0, None),  # 59.2 x 1.05 = 62.1: fits
    (["data.seq_len=8192"], 2, "117% of usable memory"),  # refused, but a measured step can be 33% lighter
    (["data.seq_len=8192", "train.micro_batch=2"], 2, None),  # far over: refused, nothing to check
])
def test_estimate_says_when_to_check_with_measure(extra, rc, says, capsys):
    args = ["configs/model/8b.yaml", "data.synthetic=markov", "data.seq_len=4096", "train.micro_batch=1", *extra]
    assert main(["estimate", *args, "--gpu", "h100", "--gpus", "8"]) == rc
    captured = capsys.readouterr()
    notes = [x for x in captured.out.splitlines() if x.strip().startswith("note:")]
    if says is None:
        assert notes == []
    else:
        assert len(notes) == 1 and says in notes[0] and "--measure" in notes[0]
    if rc:  # the refusal names the margin it applied
        assert "margin" in captured.err and "does not fit" in captured.err


def test_estimate_refuses_what_fits_only_without_the_margin(capsys):
    """A usable memory 2% above the formula's total fits the total but not total x 1.05: refused
    (exit 2, the error names the margin); 6% above is accepted."""
    args = ["estimate", "configs/model/8b.yaml", "data.synthetic=markov", "data.seq_len=4096", "train.micro_batch=1",
            "--gpu", "h100", "--gpus", "8", "--json"]
    assert main(args) == 0
    est = json.loads(capsys.readouterr().out)
    memory_gib = est["memory_usable_gib"] / 0.9  # the default headroom
    for above, rc in ((1.02, 2), (1.06, 0)):
        headroom = above * est["memory_gib_per_gpu"] / memory_gib
        assert main([*args, "--headroom", f"{headroom:.6f}"]) == rc
        err = capsys.readouterr().err
        assert ("x 1.05 margin" in err) == bool(rc), err


def test_the_fit_verdict_keeps_the_margin():
    """`fits` is the formula total times FIT_MARGIN within the usable memory: a total of 96% of it fits
    without the margin but not with it, so the planner and estimate refuse it."""
    from kiln.config import load_config
    from kiln.planner.memory import FIT_MARGIN, FIT_MARGIN_MOE, fit_margin, fits

    assert 1 < FIT_MARGIN < FIT_MARGIN_MOE
    dense = load_config([], ["data.synthetic=markov"]).model
    moe = load_config([], ["data.synthetic=markov", "model.moe.n_experts=4"]).model
    assert fit_margin(dense) == FIT_MARGIN and fit_margin(moe) == FIT_MARGIN_MOE
    assert fits(0.9 / FIT_MARGIN, 0.9, dense) and not fits(0.96 * 0.9, 0.9, dense)
    assert not fits(0.9 / FIT_MARGIN, 0.9, moe)  # MoE needs its larger margin


def test_unique_tokens_plans_with_the_repeated_data_law(capsys):
    from kiln.planner.laws import MUENNIGHOFF

    c = 6 * 8.67e9 * 178e9
    p = run_json(capsys, "--flops", str(c), "--unique-tokens", "25B")
    assert p["law"] == "muennighoff"
    assert p["params_opt"] == pytest.approx(6.8e9, rel=0.01)  # the published optimal allocation
    assert p["epochs"] == pytest.approx(p["tokens"] / 25e9)
    assert p["predicted_loss"] == pytest.approx(MUENNIGHOFF.loss(p["params"], p["tokens"], 25e9))
    q = run_json(capsys, "--params", "6.34e9", "--tokens", "242e9", "--unique-tokens", "25e9")
    assert q["params"] != 6.34e9  # the shape moves N; the loss is evaluated at the shape
    assert q["predicted_loss"] == pytest.approx(MUENNIGHOFF.loss(q["params"], 242e9, 25e9))


def test_inference_tokens_reproduce_sardana(capsys):
    p = run_json(capsys, "--target-loss", "1.947", "--inference-tokens", "2e12", "--law", "sardana")
    n, d = p["law_params_tokens"]
    assert n == pytest.approx(2.418e10, rel=1e-3) and d == pytest.approx(2.657e12, rel=1e-3)
    # the same question asked as "match a 70B model trained on 1T tokens" (loss 1.9473, unrounded)
    q = run_json(capsys, "--params", "70B", "--tokens", "1T", "--inference-tokens", "2e12", "--law", "sardana")
    assert q["target_loss"] == pytest.approx(1.947, abs=5e-4)
    assert q["law_params_tokens"][0] == pytest.approx(2.418e10, rel=0.01)


@pytest.mark.parametrize("argv", [
    ["--flops", "1e21", "--unique-tokens", "10B", "--law", "epoch"],
    ["--params", "1B", "--tokens", "5B", "--unique-tokens", "10B"],
    ["--flops", "1e21", "--law", "muennighoff"],
    ["--target-loss", "1.5", "--law", "sardana"],  # below E = 1.69
    ["--target-loss", "2.0", "--law", "kaplan"],
    ["--params", "7B", "--inference-tokens", "1T"],
])
def test_new_budget_flags_refuse_bad_combinations(argv, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: ")


# ---- MFU defaults and edge cases (issue 13 item 5)
@pytest.mark.parametrize("gpu,mfu,run", [("v100", 0.213, "GPT-3"), ("a100", 6 * 65.2e9 * 380 / 312e12, "LLaMA 65B"),
                                          ("h100", 0.41, "Llama 3 405B"), ("h200", 0.41, "Llama 3 405B"),
                                          ("tpu-v4", 0.462, "PaLM 540B"), ("mi300x", 0.40, "40% assumed")])
def test_default_mfu_per_generation_names_its_published_run(gpu, mfu, run, capsys):
    """Published MFUs: PaLM's Table 3 (GPT-3 21.3%, PaLM 46.2%), LLaMA's 380 tokens/s/GPU on A100,
    Llama 3's Table 4 (41% on 16K H100)."""
    p = run_json(capsys, "--flops", "1e21", "--gpu", gpu)
    assert p["mfu"] == pytest.approx(mfu, abs=1e-3)
    assert run in p["mfu_source"] and run in p["assumptions"]["mfu"]
    hours = p["model_flops"] / (p["mfu"] * {"v100": 125, "a100": 312, "h100": 989, "h200": 989, "tpu-v4": 275,
                                             "mi300x": 1307}[gpu] * 1e12) / 3600
    assert p["gpu_hours"] == pytest.approx(hours)


def test_estimate_keeps_the_plans_mfu_and_price(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    p = run_json(capsys, "--flops", "1e21", "--gpu", "h100", "--gpus", "8", "--mfu", "0.3",
                 "--price-per-gpu-hour", "2.5", "--out", str(out))
    assert main(["estimate", str(out), "--gpu", "h100", "--gpus", "8", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    # same MFU and price: the same cost up to the last step's rounding of tokens to whole batches
    assert est["mfu"] == 0.3 and est["cost_usd"] == pytest.approx(p["cost_usd"], rel=1e-3)
    assert main(["estimate", str(out), "--gpu", "h100", "--gpus", "8", "--mfu", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mfu"] == 0.5  # a flag still overrides the plan
    assert main(["estimate", str(out), "--gpu", "a100", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cost_usd"] != pytest.approx(p["cost_usd"])  # a100's own price


def test_printed_price_and_tiny_budget_amounts(capsys):
    assert main(["plan", "--flops", "1e17", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "$3.00/GPU-hour" in out
    cost = next(line for line in out.splitlines() if line.startswith("cost"))
    assert "$0 " not in cost and "$0," not in cost and " 0 GPU-hours" not in cost
    p = run_json(capsys, "--flops", "1e17", "--gpu", "h100")
    assert f"${p['cost_usd']:.3g}" in cost  # the real, small number


def test_plan_config_evaluates_and_checkpoints_in_proportion_to_its_steps(tmp_path, capsys):
    for flops in ("1e19", "1e21"):
        out = tmp_path / f"{flops}.yaml"
        p = run_json(capsys, "--flops", flops, "--gpu", "h100", "--gpus", "8", "--out", str(out))
        cfg = load_config([str(out)])
        assert 40 <= p["steps"] / cfg.train.eval_every <= 50
        assert 15 <= p["steps"] / cfg.checkpoint.every <= 20


def test_huge_budget_says_the_model_is_too_large(capsys):
    assert main(["plan", "--flops", "1e29"]) == 2
    err = capsys.readouterr().err
    assert "largest shape" in err and "larger budget" not in err


def test_automatic_gpu_count_stays_within_the_gpus_limit(capsys, monkeypatch):
    from kiln.planner import plan as planmod

    seen = []
    real = planmod.costs.run_cost

    def spy(flops, acc, gpus, *a, **k):
        seen.append(gpus)
        return real(flops, acc, gpus, *a, **k)

    monkeypatch.setattr(planmod.costs, "run_cost", spy)
    assert main(["plan", "--flops", "1e28", "--gpu", "h100"]) == 2
    assert "no GPU count up to 524288" in capsys.readouterr().err
    assert max(seen) <= planmod.BOUNDS["gpus"][1]


@pytest.mark.parametrize("argv", [["plan", "--flops", "1e21", "--flops", "1e22"],
                                  ["plan", "--flops", "1e21", "--json", "--json"],
                                  ["plan", "--flops", "1e21", "--gpu", "h100", "--mfu", "1.0"],
                                  ["estimate", "configs/model/8b.yaml", "--gpu", "h100", "--gpus", "8", "--gpus", "4"]])
def test_repeated_flags_and_mfu_1_refused(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: ")


@pytest.mark.parametrize("verb", ["plan", "estimate"])
def test_help_gives_every_flag_a_description_with_its_default(verb, capsys):
    from kiln.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and verb in a.choices).choices[verb]
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "default" in action.help or "required" in action.help, action.option_strings
