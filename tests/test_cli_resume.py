"""The demo survives what users do to it: Ctrl-C or SIGTERM mid-run, resuming with only --out,
a damaged checkpoint, a second run into the same folder, torchrun without --distributed."""

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
