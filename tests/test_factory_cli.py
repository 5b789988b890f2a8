"""Configuring optimizers (registry, decay groups, config files), the command line, and the
demo end to end: a short run, its files, and resume equality."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from optim_table import TABLE

from optimizer import AdamW8bit, Lion8bit, cli
from optimizer.demo.llama import Llama
from optimizer.factory import (
    OPTIMIZERS,
    STATE_DTYPES,
    VARIANTS,
    ConfigError,
    clip_grad_norm_,
    create_optimizer,
    load_config,
    state_dtype_of,
)
from optimizer.scheduler import get_scheduler

TINY = ["--steps", "12", "--warmup-steps", "2", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
        "--batch-size", "4", "--eval-every", "6", "--checkpoint-every", "4", "--no-progress"]


def test_registry_and_test_table_list_the_same_optimizers():
    assert sorted(OPTIMIZERS) == sorted(i.name.lower() for i in TABLE)
    assert all(issubclass(i.cls, OPTIMIZERS[i.name.lower()].cls) for i in TABLE)  # (Muon's row: a test subclass)


def test_decay_groups_exempt_biases_norms_and_1d():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    decay, exempt = opt.param_groups
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in exempt["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias)}
    opt = create_optimizer(model, "lion", weight_decay=0.5, decay_embeddings=False)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(model[1].weight)}
    assert opt.param_groups[0]["lr"] == OPTIMIZERS["lion"].lr
    opt = create_optimizer(model, "adamw", no_decay=["1.weight"])
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(model[0].weight)}


def test_llama_groups_and_counts_are_reported(caplog):
    model = Llama(dim=32, layers=2, heads=2)
    with caplog.at_level("INFO", logger="optimizer"):
        opt = create_optimizer(model, "adamw", weight_decay=0.1)
    n_norms = 2 * 2 + 1  # two RMSNorms per block and the final one
    assert len(opt.param_groups[1]["params"]) == n_norms
    assert all(p.ndim == 2 for p in opt.param_groups[0]["params"])
    assert f"no_decay: {n_norms} tensors, {n_norms * 32:,} params, weight_decay=0.0" in caplog.text


def test_frozen_parameters_are_left_out_and_plain_lists_work():
    a, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = create_optimizer([a, b], "adamw")
    assert [len(g["params"]) for g in opt.param_groups] == [1]


def test_factory_errors_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"Invalid optimizer name: 'sgd'; valid names are "
                       r"\['adamw', 'adamw8bit', 'lion', 'lion8bit', 'muon'\]"):
        create_optimizer(torch.nn.Linear(2, 2), "sgd")
    with pytest.raises(ConfigError, match=r"Invalid argument for optimizer 'lion'.*eps.*it takes \['lr', 'betas'"):
        create_optimizer(torch.nn.Linear(2, 2), "lion", eps=1e-8)
    with pytest.raises(ValueError, match="beta parameter at index 0: 1.5"):
        create_optimizer(torch.nn.Linear(2, 2), "adamw", betas=(1.5, 0.9))


def test_8bit_names_build_8bit_optimizers_with_the_algorithms_defaults():
    model = Llama(dim=64, layers=1, heads=2)
    for name, cls, algorithm in (("adamw8bit", AdamW8bit, "adamw"), ("Lion8bit", Lion8bit, "lion")):
        opt = create_optimizer(model, name)
        assert type(opt) is cls and opt.defaults["state_dtype"] is torch.uint8
        assert opt.param_groups[0]["lr"] == OPTIMIZERS[algorithm].lr == VARIANTS[name.lower()].lr
        assert opt.param_groups[0]["weight_decay"] == OPTIMIZERS[algorithm].weight_decay
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    opt.step()  # Lion8bit: the 64x64 and larger matrices keep 8-bit momenta, the norms float32
    embed = opt.state[model.embed.weight]
    assert embed["exp_avg"].dtype is torch.uint8 and "exp_avg_scale" in embed
    assert opt.state[model.norm.weight]["exp_avg"].dtype is torch.float32


@pytest.mark.parametrize(("text", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("uint8", torch.uint8),
                                             (None, None), (torch.bfloat16, torch.bfloat16)])
def test_state_dtype_is_taken_as_text_or_dtype(text, dtype):
    assert state_dtype_of(text) is dtype
    opt = create_optimizer(torch.nn.Linear(64, 64), "adamw", state_dtype=text)
    assert opt.defaults["state_dtype"] is dtype


def test_lean_options_reach_the_optimizer_and_bad_values_name_the_argument():
    opt = create_optimizer(torch.nn.Linear(64, 64).to(torch.bfloat16), "lion", stochastic_rounding=True, seed=7,
                           min_8bit_size=1024, state_dtype="uint8")
    assert {k: opt.defaults[k] for k in ("stochastic_rounding", "seed", "min_8bit_size", "state_dtype")} == {
        "stochastic_rounding": True, "seed": 7, "min_8bit_size": 1024, "state_dtype": torch.uint8}
    with pytest.raises(ConfigError, match=r"Invalid state_dtype: 'int8'; allowed values are "
                       r"\['bf16', 'fp32', 'uint8'\]"):
        create_optimizer(torch.nn.Linear(2, 2), "adamw", state_dtype="int8")
    with pytest.raises(ValueError, match=r"Invalid state_dtype: torch.float16"):  # a dtype: the optimizer's own check
        create_optimizer(torch.nn.Linear(2, 2), "adamw8bit", state_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Invalid stochastic_rounding: 'yes'"):
        create_optimizer(torch.nn.Linear(2, 2), "lion8bit", stochastic_rounding="yes")
    with pytest.raises(ValueError, match=r"Invalid seed: -1"):
        create_optimizer(torch.nn.Linear(2, 2), "adamw", stochastic_rounding=True, seed=-1)
    with pytest.raises(ValueError, match=r"Invalid min_8bit_size: 0"):
        create_optimizer(torch.nn.Linear(2, 2), "adamw", min_8bit_size=0)
    assert sorted(STATE_DTYPES) == ["bf16", "fp32", "uint8"]


def test_a_config_file_builds_an_8bit_optimizer(tmp_path):
    """create_optimizer(model, **load_config(file)): names and dtypes as text, as a file writes them."""
    (tmp_path / "opt.yaml").write_text("name: adamw8bit\nlr: 1.0e-3\nbetas: [0.9, 0.95]\nstate_dtype: uint8\n"
                                       "min_8bit_size: 256\n")
    opt = create_optimizer(torch.nn.Linear(16, 16), **load_config(tmp_path / "opt.yaml"))
    assert type(opt) is AdamW8bit and opt.defaults["min_8bit_size"] == 256 and opt.param_groups[0]["lr"] == 1e-3
    (tmp_path / "opt.json").write_text('{"name": "lion", "state_dtype": "bf16", "stochastic_rounding": true}')
    opt = create_optimizer(torch.nn.Linear(16, 16), **load_config(tmp_path / "opt.json"))
    assert opt.defaults["state_dtype"] is torch.bfloat16 and opt.defaults["stochastic_rounding"] is True
    (tmp_path / "bad.yaml").write_text("name: lion8bit\nstate_dtype: 8bit\n")
    with pytest.raises(ConfigError, match=r"Invalid state_dtype: '8bit'"):
        create_optimizer(torch.nn.Linear(16, 16), **load_config(tmp_path / "bad.yaml"))


def test_get_scheduler_takes_the_family_names():
    opt = create_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1.0)
    sched = get_scheduler("wsd", opt, warmup_steps=0, total_steps=10, decay_steps=5, decay_type="linear")
    assert sched.get_lr(5) == 1.0 and sched.get_lr(10) == 0.0


def test_clip_grad_norm_keeps_the_direction():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    norm = clip_grad_norm_([p], 1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    with pytest.raises(ValueError, match="max_norm: -1"):
        clip_grad_norm_([p], -1)


def test_load_config_reads_yaml_and_json_safely(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 5\noptimizer_args:\n  lion: {lr: 1.0e-4, betas: [0.9, 0.98]}\n")
    assert load_config(tmp_path / "a.yaml")["optimizer_args"]["lion"]["betas"] == [0.9, 0.98]
    (tmp_path / "a.json").write_text('{"steps": 5}')
    assert load_config(tmp_path / "a.json") == {"steps": 5}
    (tmp_path / "evil.yaml").write_text("steps: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        load_config(tmp_path / "list.json")
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ConfigError, match="suffix must be one of"):
        load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"stepz": 5}, ["'stepz'", "allowed keys are", "'steps'"]),
        ({"steps": -1}, ["steps", "-1"]),
        ({"steps": "many"}, ["steps", "'many'"]),
        ({"schedule": "cosin"}, ["schedule", "'cosin'", "'cosine'"]),
        ({"optimizers": ["adamw", "sgd"]}, ["optimizers", "'sgd'", "['adamw', 'lion', 'muon']"]),
        ({"optimizer_args": {"lion": {"eps": 1e-8}}}, ["'lion'", "eps", "it takes"]),
        ({"optimizer_args": {"adamw": {"lr": -1}}}, ["learning rate", "-1"]),
        ({"warmup_steps": 500}, ["Invalid warmup_steps in", "500", "--steps 300"]),
        ({"adamw_lr": "fast"}, ["Invalid adamw_lr in", "'fast'", "expected a number"]),
        ({"state_dtype": "int8"}, ["Invalid state_dtype in", "'int8'", "['bf16', 'fp32', 'uint8']"]),
        ({"param_dtype": "fp16"}, ["Invalid param_dtype in", "'fp16'", "['bf16', 'fp32']"]),
        ({"stochastic_rounding": "yes"}, ["Invalid stochastic_rounding in", "'yes'", "true or false"]),
        ({"stochastic_rounding": True}, ["Invalid stochastic_rounding in", "bf16", "'fp32'"]),
        ({"optimizer_args": {"adamw": {"state_dtype": "int8"}}}, ["optimizer_args.adamw.state_dtype", "'int8'",
                                                                   "'uint8'"]),
        ({"optimizer_args": {"lion": {"min_8bit_size": 0}}}, ["optimizer_args.lion.min_8bit_size", "0"]),
    ],
)
def test_bad_config_values_exit_2_with_one_line(tmp_path, capsys, config, words):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.main(["demo", "--config", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_bad_flags_exit_2_without_traceback():
    for argv in (["demo", "--steps", "x"], ["demo", "--optimizers", "sgd"], ["plot-schedule", "cosin"], ["nope"]):
        done = subprocess.run([sys.executable, "-m", "optimizer", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, argv
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = subprocess.run([sys.executable, "-m", "optimizer", "plot-schedule", "cosin"], capture_output=True, text=True)
    assert "'cosine'" in done.stderr and "'warmup_stable_decay'" in done.stderr


def test_every_subcommand_has_help():
    for argv in ([], ["demo"], ["sweep"], ["plot-schedule"]):
        done = subprocess.run([sys.executable, "-m", "optimizer", *argv, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: python -m optimizer" in done.stdout
        assert len(done.stdout.splitlines()) < 80  # about a screen (two lines of flags per optimizer)


def test_plot_schedule_writes_a_png(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli.main(["plot-schedule", "warmup_stable_decay", "--warmup-steps", "10", "--total-steps", "100",
                     "--set", "decay_type=cosine", "--min-lr-ratio", "0.1", "-o", str(out)]) == 0
    image = pytest.importorskip("matplotlib.image").imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100
    assert "lr(100) end = 0.0001" in capsys.readouterr().out


def test_plot_schedule_text_rendering_and_key_values(capsys):
    assert cli.main(["plot-schedule", "cosine", "--warmup-steps", "9", "--total-steps", "100", "--peak-lr", "1"]) == 0
    out = capsys.readouterr().out
    assert "lr(0) = 0.1 " in out and "lr(9) end of warmup = 1 " in out and "lr(100) end = 0" in out
    assert out.count("#") > 100


def read_summary(path):
    return json.loads((path / "summary.json").read_text())


def test_demo_short_run_writes_table_and_files(tmp_path, capsys):
    assert cli.main(["demo", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train loss" in out and "held-out" in out and "state MiB" in out and "state B/param" in out
    mpimg = pytest.importorskip("matplotlib.image")
    for name in ("loss.png", "lr.png"):
        assert mpimg.imread(tmp_path / name).ndim == 3
    summary = read_summary(tmp_path)
    assert set(summary["results"]) == {"adamw", "lion", "muon"}  # the default run trains all three
    for name, r in summary["results"].items():
        assert len(r["history"]["loss"]) == 12 and r["held_out_loss"] < summary["unigram_entropy"] + 3
        assert [s for s, _ in r["history"]["held_out"]] == [0, 6, 12]  # from step 0
        assert r["state_bytes"] > 0 and r["tokens_per_s"] > 0
        assert r["state_bytes_per_param"] == r["state_bytes"] / r["params"]
    # AdamW keeps two fp32 states per parameter, Lion one
    assert summary["results"]["adamw"]["state_bytes"] == 2 * summary["results"]["lion"]["state_bytes"] + \
        4 * sum(1 for _ in Llama(dim=32, layers=1, heads=2, max_seq=32).parameters())
    assert summary["config"]["state_dtype"] == summary["config"]["param_dtype"] == "fp32"


def test_demo_state_bytes_count_8bit_codes_scales_and_counters(tmp_path, capsys):
    """--state-dtype uint8: the matrices of 4096 values or more keep a byte per value and a float32 scale
    per row and block of 256, the others float32 states; every byte is counted, counters too."""
    argv = [*TINY, "--dim", "64", "--state-dtype", "uint8", "--optimizers", "adamw", "lion"]
    assert cli.main(["demo", *argv, "--out", str(tmp_path)]) == 0
    assert ", 8-bit states" in capsys.readouterr().out
    results = read_summary(tmp_path)["results"]
    model = Llama(dim=64, layers=1, heads=2, max_seq=32)
    n = sum(p.numel() for p in model.parameters())
    for name, states in (("adamw", 2), ("lion", 1)):
        expected = 0
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() >= 4096:
                expected += states * (p.numel() + 4 * p.shape[0] * -(-p[0].numel() // 256))
            else:
                expected += states * 4 * p.numel()
            expected += 4 if name == "adamw" else 0  # the step counter
        assert results[name]["state_bytes"] == expected, name
        assert results[name]["state_bytes_per_param"] == expected / n
    assert 2.0 < results["adamw"]["state_bytes_per_param"] < 2.2
    assert 1.0 < results["lion"]["state_bytes_per_param"] < 1.1


def test_resume_reaches_exactly_the_same_losses(tmp_path, capsys):
    """--stop-after stops each optimizer; the command it prints, which gives no settings, resumes them."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["demo", *TINY, "--out", str(whole)]) == 0
    assert cli.main(["demo", *TINY, "--out", str(parts), "--stop-after", "5"]) == 0
    assert not (parts / "summary.json").exists()
    for name in ("adamw", "lion"):
        assert torch.load(parts / f"{name}.ckpt", weights_only=True)["step"] == 5
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.endswith(f"continue with: python -m optimizer demo --resume --out {parts}"), hint
    assert cli.main([*hint.split("python -m optimizer ")[1].split(), "--no-progress"]) == 0
    assert "adamw: resuming at step 5 of 12" in capsys.readouterr().out
    a, b = read_summary(whole)["results"], read_summary(parts)["results"]
    for name in ("adamw", "lion"):
        assert a[name]["history"]["loss"] == b[name]["history"]["loss"]
        assert a[name]["history"]["held_out"] == b[name]["history"]["held_out"]
        assert a[name]["history"]["lr"] == b[name]["history"]["lr"]


def test_resume_with_different_settings_is_refused(tmp_path, capsys):
    assert cli.main(["demo", *TINY, "--out", str(tmp_path), "--stop-after", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["demo", *TINY, "--out", str(tmp_path), "--resume", "--seed", "1", "--adamw-lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "Invalid --resume: --seed 1, --adamw-lr 0.1 differ from the checkpoint" in err, err
    assert "(it has seed 0, optimizer_args.adamw.lr 0.003)" in err and len(err.strip().splitlines()) == 1


def test_demo_default_model_learns_in_a_few_dozen_steps(tmp_path):
    """The CI's end-to-end run: the default model and data, 30 steps."""
    assert cli.main(["demo", "--steps", "30", "--warmup-steps", "3", "--eval-every", "30", "--checkpoint-every", "30",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    summary = read_summary(tmp_path)
    for name, r in summary["results"].items():
        first = r["history"]["loss"][0]
        assert first == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.2)  # uniform over bytes at init
        assert r["held_out_loss"] < first - 1.0, (name, r["held_out_loss"])


def test_flags_win_over_the_config_file_which_wins_over_defaults(tmp_path):
    import argparse

    path = tmp_path / "c.yaml"
    path.write_text("steps: 40\nwarmup_steps: 4\noptimizer_args:\n  lion: {lr: 1.0e-4}\n")
    cfg = cli._demo_settings(argparse.Namespace(config=str(path), steps=20, lion_weight_decay=0.5))
    assert cfg["steps"] == 20 and cfg["warmup_steps"] == 4 and cfg["batch_size"] == 16
    assert cfg["optimizer_args"]["lion"] == {"lr": 1e-4, "weight_decay": 0.5}
    cfg = cli._demo_settings(argparse.Namespace(steps=20))  # defaults that follow --steps
    assert (cfg["warmup_steps"], cfg["eval_every"], cfg["checkpoint_every"]) == (2, 3, 3)
    assert cli._demo_settings(argparse.Namespace(schedule="constant"))["min_lr_ratio"] == 0.0  # it has no floor


def test_create_optimizer_takes_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = create_optimizer(model.named_parameters(), "adamw", weight_decay=0.1, no_decay=["0.weight"])
    assert [(g["group"], len(g["params"])) for g in opt.param_groups] == [("no_decay", 4)]  # 1-D, or named


@pytest.mark.parametrize(
    ("like", "name", "expected"),
    [
        (
            "transformers",
            "cosine",
            "Hugging Face transformers' curve: lr(0) = 0   lr(10) end of warmup = 1   lr(100) end = 0",
        ),
        ("timm", "cosine", "timm's curve: lr(0) = 0   lr(10) end of warmup = 0.9755"),
        ("ours", "cosine", "this library's curve: lr(0) = 0.09091   lr(10) end of warmup = 1   lr(100) end = 0"),
    ],
)
def test_plot_schedule_says_whose_convention_it_drew(capsys, like, name, expected):
    assert cli.main(["plot-schedule", name, "--like", like, "--warmup-steps", "10", "--total-steps", "100",
                     "--peak-lr", "1"]) == 0
    assert expected in capsys.readouterr().out


def test_plot_schedule_refuses_a_name_of_another_convention(capsys):
    assert cli.main(["plot-schedule", "tanh"]) == 2
    assert "Invalid NAME: 'tanh'" in capsys.readouterr().err
    assert cli.main(["plot-schedule", "tanh", "--like", "timm"]) == 0
