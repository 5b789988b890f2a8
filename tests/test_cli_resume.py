"""The demo survives what users do to it: Ctrl-C or SIGTERM mid-run, resuming with only --out,
a damaged checkpoint, a second run into the same folder, torchrun without --distributed; and
with 8-bit states or bf16 parameters rounded stochastically, a resumed run is bit-identical."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_same_nested

from optimizer import cli

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--no-progress"]
RUN = ["--steps", "16", "--eval-every", "4", *TINY]
DEMO = [sys.executable, "-m", "optimizer", "demo"]


def histories(out) -> dict:
    results = json.loads((out / "summary.json").read_text())["results"]
    return {name: {k: r["history"][k] for k in ("loss", "held_out", "lr")} for name, r in results.items()}


def files(out) -> dict:
    """Every file of ``out`` with its bytes and modification time: equal means nothing was written."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The losses of an uninterrupted run of RUN."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["demo", *RUN, "--out", str(out)]) == 0
    return histories(out)


@pytest.fixture
def small_run(tmp_path):
    """A 12-step run stopped after 3 steps of each optimizer."""
    out = tmp_path / "run"
    assert cli.main(["demo", "--steps", "12", *TINY, "--stop-after", "3", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_the_current_step_and_resume_loses_none(tmp_path, capsys, reference, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([*DEMO, *RUN, "--checkpoint-every", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "adamw.ckpt").exists():  # two steps done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.strip().endswith(f"continue with: python -m optimizer demo --resume --out {out}"), err
    name, step = re.search(r"^SIG\w+: (\w+) checkpointed at step (\d+) of 16", err).groups()
    ckpt = torch.load(out / f"{name}.ckpt", weights_only=True)
    assert ckpt["step"] == int(step) == len(ckpt["history"]["loss"]) and int(step) < 16
    assert not (out / "summary.json").exists()

    assert cli.main(["demo", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert f"{name}: resuming at step {step} of 16 from {out / f'{name}.ckpt'}" in capsys.readouterr().out
    assert histories(out) == reference


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "missing"):
        assert cli.main(["demo", "--resume", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Invalid --resume: no checkpoint (adamw.ckpt, lion.ckpt)" in err, err
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a checkpoint"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(small_run, capsys, damage):
    path = small_run / "lion.ckpt"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "cut short": data[: len(data) // 2],
                      "not a checkpoint": b"\x80\x02K\x01."}[damage])  # a pickled 1
    before = files(small_run)
    assert cli.main(["demo", "--resume", "--out", str(small_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the checkpoint {path} is damaged" in err and "delete it to run lion again from step 0" in err, err
    assert "--overwrite" in err and files(small_run) == before


def test_a_second_run_into_the_same_out_changes_nothing(small_run):
    before = files(small_run)
    done = subprocess.run([*DEMO, "--steps", "12", *TINY, "--out", str(small_run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Invalid --out" in done.stderr and "add --resume to continue its run, or --overwrite" in done.stderr
    assert files(small_run) == before and done.stdout == ""


def test_overwrite_starts_again_and_keeps_files_that_are_not_the_runs(small_run):
    (small_run / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--steps", "6", *TINY, "--optimizers", "adamw", "--overwrite", "--out",
                     str(small_run)]) == 0
    assert sorted(p.name for p in small_run.iterdir()) == ["adamw.ckpt", "loss.png", "lr.png", "notes.txt",
                                                            "summary.json"]
    assert len(histories(small_run)["adamw"]["loss"]) == 6


def test_out_that_is_a_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "results"
    path.write_text("mine")
    done = subprocess.run([*DEMO, "--steps", "12", *TINY, "--out", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"python -m optimizer demo: error: Invalid --out: {str(path)!r} is a file, not a folder"]
    assert path.read_text() == "mine" and list(tmp_path.iterdir()) == [path]


def test_torchrun_without_distributed_trains_as_ddp_and_says_so_once(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "optimizer", "demo", "--steps", "4", *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("torchrun started 2 processes: training with --distributed ddp") == 1, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["distributed"] == "ddp"


PRECISIONS = {"8-bit states": ["--state-dtype", "uint8"],
        "bf16 params, stochastic rounding": ["--param-dtype", "bf16", "--stochastic-rounding"]}


def final_checkpoints(out) -> dict:
    return {name: torch.load(out / f"{name}.ckpt", weights_only=True) for name in ("adamw", "lion")}


@pytest.mark.parametrize("flags", PRECISIONS.values(), ids=list(PRECISIONS))
def test_a_low_precision_run_resumes_bit_identically(tmp_path, capsys, flags):
    """Stopped mid-run (between two checkpoints) and resumed with only --out, a run with 8-bit states (codes
    and scales in the checkpoint) or with bf16 parameters rounded stochastically (the rounding step in the
    checkpoint's param_groups) ends with the losses, parameters and optimizer state of an uninterrupted run."""
    argv = [*RUN, "--dim", "64", "--checkpoint-every", "4", *flags]  # dim 64: every matrix >= 4096 values
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["demo", *argv, "--out", str(whole)]) == 0
    assert cli.main(["demo", *argv, "--stop-after", "5", "--out", str(parts)]) == 0
    for name, ckpt in final_checkpoints(parts).items():
        assert ckpt["step"] == 5
        state, groups = ckpt["optimizer"]["state"], ckpt["optimizer"]["param_groups"]
        if "uint8" in flags:
            assert any(s["exp_avg"].dtype == torch.uint8 and "exp_avg_scale" in s for s in state.values()), name
        else:
            assert all(v.dtype == torch.bfloat16 for v in ckpt["model"].values()), name
            assert all(g["stochastic_rounding"] and g["rounding_step"] == 5 for g in groups), name
    capsys.readouterr()
    assert cli.main(["demo", "--resume", "--out", str(parts), "--no-progress"]) == 0
    assert "adamw: resuming at step 5 of 16" in capsys.readouterr().out
    assert histories(parts) == histories(whole)
    a, b = final_checkpoints(whole), final_checkpoints(parts)
    for name in a:
        for key in ("model", "optimizer"):
            assert_same_nested(a[name][key], b[name][key], f"{name}.{key}")


def test_resume_refuses_other_precision_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", "--steps", "12", *TINY, "--state-dtype", "uint8", "--stop-after", "2",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["demo", "--resume", "--out", str(out), "--state-dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "Invalid --resume: --state-dtype 'bf16' differs from the checkpoint" in err, err
    assert "(it has state_dtype 'uint8')" in err and len(err.strip().splitlines()) == 1


def test_fsdp2_with_8bit_states_checkpoints_and_resumes_bit_identically(tmp_path):
    """Under torchrun the checkpoints go through torch.distributed.checkpoint's full state dicts, which
    take no torch.dtype: the optimizer's state_dtype option travels as its name and comes back."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "optimizer", "demo"]
    argv = ["--steps", "6", "--eval-every", "3", *TINY, "--dim", "64", "--distributed", "fsdp2",
            "--state-dtype", "uint8"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for args in ([*argv, "--out", str(whole)], [*argv, "--stop-after", "3", "--out", str(parts)],
                 ["--resume", "--out", str(parts)]):
        done = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert histories(parts) == histories(whole)
    groups = torch.load(parts / "adamw.ckpt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["state_dtype"] for g in groups} == {"torch.uint8"}
