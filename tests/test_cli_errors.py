"""Every error of the command line is one line naming the flag or config key the user wrote,
exit code 2, and nothing written; config keys are the flags; YAML numbers are numbers."""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import fails

from optimizer import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("argv", "words"), [
    (["--steps", "20", "--warmup-steps", "30"], ["Invalid --warmup-steps: 30", "--steps 20"]),
    (["--steps", "0"], ["Invalid --steps: 0", ">= 1"]),
    (["--adamw-lr", "-1"], ["Invalid --adamw-lr:", "-1"]),
    (["--lion-weight-decay", "nan"], ["Invalid --lion-weight-decay:", "nan"]),
    (["--dim", "30"], ["Invalid --dim: 30", "--heads 4"]),
    (["--schedule", "constant", "--min-lr-ratio", "0.1"], ["Invalid --min-lr-ratio: 0.1", "'constant'", "no floor"]),
    (["--min-lr-ratio", "2"], ["Invalid --min-lr-ratio: 2"]),
    (["--clip-grad-norm", "-1"], ["Invalid --clip-grad-norm: -1"]),
    (["--device", "gpu"], ["Invalid --device: 'gpu'"]),
    (["--stop-after", "0"], ["Invalid --stop-after: 0"]),
    (["--optimizers", "lion", "lion"], ["Invalid --optimizers:"]),
    (["--distributed", "fsdp2"], ["Invalid --distributed: 'fsdp2' needs torchrun"]),
    (["--stochastic-rounding"], ["Invalid --stochastic-rounding:", "bf16", "--param-dtype is 'fp32'"]),
    (["--param-dtype", "fp32", "--stochastic-rounding", "--state-dtype", "uint8"],
     ["Invalid --stochastic-rounding:", "--param-dtype is 'fp32'"]),
])
def test_a_bad_flag_is_named_and_nothing_is_written(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    err = fails(capsys, "demo", *argv, "--out", str(out))
    for w in words:
        assert w in err, err
    assert not out.exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["--state-dtype", "int8"], ["argument --state-dtype: invalid choice: 'int8'", "uint8"]),
    (["--param-dtype", "fp16"], ["argument --param-dtype: invalid choice: 'fp16'", "bf16"]),
])
def test_a_bad_precision_choice_is_one_line(tmp_path, argv, words):
    done = subprocess.run([sys.executable, "-m", "optimizer", "demo", *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for w in words:
        assert w in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_config_keys_are_the_flags_and_yaml_numbers_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 and 1e2 as strings; where a number is expected they are numbers."""
    path = tmp_path / "c.yaml"
    path.write_text("adamw_lr: 1e-3\nlion_weight_decay: 2\nsteps: 1e2\nwarmup_steps: '5'\nno_progress: true\n"
                    "optimizer_args:\n  adamw: {lr: 5e-3, eps: 1e-6}\n  lion: {lr: 1e-4, betas: [0.9, 99e-2]}\n")
    cfg = cli._demo_settings(argparse.Namespace(config=str(path)))
    assert (cfg["steps"], cfg["warmup_steps"]) == (100, 5) and isinstance(cfg["steps"], int)
    assert cfg["optimizer_args"] == {"adamw": {"lr": 1e-3, "eps": 1e-6},  # adamw_lr wins, as --adamw-lr would
                                     "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 2.0}}


def test_muons_adamw_options_in_a_config_are_numbers_and_checked(tmp_path, capsys):
    """optimizer_args.muon.adamw_lr (a None default, a float annotation): YAML's text 1e-3 is a number,
    and a bad value is one line naming the key and the file."""
    path = tmp_path / "c.yaml"
    path.write_text("optimizer_args:\n  muon: {adamw_lr: 1e-3, adamw_weight_decay: 0}\n")
    cfg = cli._demo_settings(argparse.Namespace(config=str(path), optimizers=["muon"]))
    assert cfg["optimizer_args"]["muon"] == {"adamw_lr": 1e-3, "adamw_weight_decay": 0}
    assert isinstance(cfg["optimizer_args"]["muon"]["adamw_lr"], float)
    path.write_text("optimizer_args:\n  muon: {adamw_lr: fast}\n")
    err = fails(capsys, "demo", "--config", str(path), "--out", str(tmp_path / "out"))
    assert f"Invalid optimizer_args.muon.adamw_lr in {path}: 'fast' (expected a number)" in err, err


def test_every_setting_flag_is_a_config_key_with_underscores(tmp_path):
    """A config file of each flag's key ('-' -> '_') and value gives the settings the flags give."""
    flags = {"--optimizers": ["lion"], "--adamw-lr": "0.002", "--adamw-weight-decay": "0.2", "--lion-lr": "1e-4",
             "--lion-weight-decay": "0.5", "--clip-grad-norm": "0.5", "--schedule": "linear", "--warmup-steps": "3",
             "--min-lr-ratio": "0.2", "--steps": "30", "--dim": "64", "--layers": "2", "--heads": "4",
             "--seq-len": "16", "--batch-size": "8", "--device": "cpu", "--distributed": "none", "--seed": "7",
             "--out": str(tmp_path / "o"), "--eval-every": "5", "--checkpoint-every": "10", "--state-dtype": "uint8",
             "--param-dtype": "bf16", "--stochastic-rounding": True}
    argv = [x for flag, value in flags.items()
            for x in (flag, *([value] if isinstance(value, str) else [] if value is True else value))]
    parser = cli.Parser()
    cli._demo_parser(parser.add_subparsers())
    from_flags = cli._demo_settings(parser.parse_args(["demo", *argv]))
    path = tmp_path / "c.yaml"  # as YAML 1.1 reads them: 1e-4 is text, the rest numbers or text
    path.write_text("".join(f"{flag[2:].replace('-', '_')}: {value}\n" for flag, value in flags.items()))
    assert cli._demo_settings(argparse.Namespace(config=str(path))) == from_flags
    assert from_flags["optimizer_args"]["lion"] == {"lr": 1e-4, "weight_decay": 0.5}
    assert (from_flags["state_dtype"], from_flags["param_dtype"], from_flags["stochastic_rounding"]) == (
        "uint8", "bf16", True)


@pytest.mark.parametrize(("name", "text", "words"), [
    ("c.yaml", "steps: 12\nadamw_lr: [1]\n", ["Invalid adamw_lr in", "c.yaml: [1] (expected a number)"]),
    ("c.yaml", "steps: 12\nwarmup_steps: 50\n", ["Invalid warmup_steps in", "50", "steps in", "12"]),
    ("c.yaml", "config: other.yaml\n", ["Invalid config key 'config' in", "'adamw_lr'"]),
    ("c.yaml", "schedule: cosin\n", ["Invalid schedule in", "'cosin'", "'cosine'"]),
    ("c.yaml", "optimizer_args:\n  lion: {betas: [0.9, 2]}\n", ["Invalid optimizer_args.lion.betas in", "2"]),
    ("c.yaml", "optimizer_args:\n  lion: {eps: 1e-8}\n", ["Invalid optimizer_args.lion.eps in", "takes no 'eps'"]),
    ("c.yaml", "state_dtype: int8\n", ["Invalid state_dtype in", "'int8'", "['bf16', 'fp32', 'uint8']"]),
    ("c.yaml", "param_dtype: bf16\nstochastic_rounding: 1\n",
     ["Invalid stochastic_rounding in", "expected true or false"]),
    ("c.yaml", "stochastic_rounding: true\n", ["Invalid stochastic_rounding in", "c.yaml: it rounds bf16", "'fp32'"]),
    ("c.yaml", "optimizer_args:\n  adamw: {state_dtype: int8}\n", ["Invalid optimizer_args.adamw.state_dtype in",
                                                                   "'int8'", "['bf16', 'fp32', 'uint8']"]),
    ("c.yaml", "steps: 12\n  warmup_steps: 2\n", ["c.yaml:2:", "not valid YAML"]),
    ("c.json", '{"steps": 12,\n "seed": }', ["c.json:2:10:", "not valid JSON"]),
])
def test_a_bad_config_names_the_key_or_the_line(tmp_path, capsys, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    err = fails(capsys, "demo", "--config", str(path), "--out", str(tmp_path / "out"))
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    err = fails(capsys, "demo", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"))
    assert f"Invalid --config: {str(tmp_path / 'c.yaml')!r} is not a file" in err
    assert list(tmp_path.iterdir()) == []


def test_a_flag_wins_over_a_bad_config_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: -5\n")
    assert cli._demo_settings(argparse.Namespace(config=str(path), steps=12))["steps"] == 12


@pytest.mark.parametrize(("argv", "words"), [
    (["constant", "--min-lr-ratio", "0.1"], ["Invalid --min-lr-ratio:", "no floor"]),
    (["cosine", "--min-lr", "0.1"], ["Invalid --min-lr: 0.1", "peak"]),
    (["cosine", "--warmup-steps", "2000"], ["Invalid --warmup-steps: 2000", "--total-steps"]),
    (["cosine", "--like", "transformers", "--set", "num_cycles=x"], ["--set num_cycles"]),
])
def test_plot_schedule_errors_name_the_flag(capsys, argv, words):
    err = fails(capsys, "plot-schedule", *argv)
    for w in words:
        assert w in err, err


def test_plot_schedule_refuses_an_output_it_cannot_write(tmp_path, capsys, monkeypatch):
    err = fails(capsys, "plot-schedule", "cosine", "-o", str(tmp_path / "missing" / "lr.png"))
    assert "Invalid -o/--output" in err and "does not exist" in err
    err = fails(capsys, "plot-schedule", "cosine", "-o", str(tmp_path / "lr.txt"))
    assert "Invalid -o/--output" in err and "'txt' is not supported" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    err = fails(capsys, "plot-schedule", "cosine", "-o", str(tmp_path / "lr.png"))
    assert "Invalid -o/--output" in err and "matplotlib" in err and "without -o" in err
    assert list(tmp_path.iterdir()) == []


def test_numpy_is_a_core_dependency_so_importing_prints_nothing():
    """Without numpy, importing torch warns "Failed to initialize NumPy" on every run: numpy is in
    the core dependencies (torch itself does not require it)."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"numpy\b", d) for d in deps), deps
    done = subprocess.run([sys.executable, "-c", "import optimizer"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
