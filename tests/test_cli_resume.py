"""The demo survives what users do to it: Ctrl-C or SIGTERM mid-run, resuming with only --out,
a damaged checkpoint, a second run into the same folder, torchrun without --distributed; and
with 8-bit states or bf16 parameters rounded stochastically, a resumed run is bit-identical."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_same_nested

from optimizer import cli
from optimizer.demo.train import DEFAULTS

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
        assert len(err.splitlines()) == 1, err
        assert "Invalid --resume: no checkpoint (adamw.ckpt, lion.ckpt, muon.ckpt)" in err, err
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


# ----- one run per --out, a folder that cannot be written, checkpoints that do not fit ----------------

LONG = ["--steps", "60", "--checkpoint-every", "4", *TINY]  # long enough for other runs to try its folder


def summary_steps(out) -> dict:
    results = json.loads((out / "summary.json").read_text())["results"]
    return {name: len(r["history"]["loss"]) for name, r in results.items()}


def test_two_runs_into_one_out_one_trains_the_other_is_refused_up_front(tmp_path, capsys):
    """Issue 27: two runs started together into one --out both passed the "already holds files" check
    and wrote the same fixed adamw.ckpt.tmp; both could die. Now the second is refused at once (exit 2,
    naming the run that holds the folder), and while the first trains, nothing another run does
    (again, --resume, --overwrite) removes or replaces its files: it ends with complete results."""
    out = tmp_path / "run"
    procs = [subprocess.Popen([*DEMO, *LONG, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    holds = f"{str(out)!r} is in use by another run (pid {winner.pid} on {socket.gethostname()})"
    assert loser.returncode == 2 and err.strip().splitlines() == [
        f"python -m optimizer demo: error: Invalid --out: {holds}; wait for it to end, or choose another --out"], err
    while not (out / "adamw.ckpt").exists():  # the winner has files to lose
        assert winner.poll() is None and time.monotonic() < deadline, winner.communicate()
        time.sleep(0.01)
    for again in ([], ["--resume"], ["--overwrite"]):
        assert cli.main(["demo", *LONG, *again, "--out", str(out)]) == 2, again
        err = capsys.readouterr().err
        assert holds in err and len(err.strip().splitlines()) == 1, err
    assert winner.poll() is None  # (all of them while it trained)
    _, err = winner.communicate(timeout=120)
    assert winner.returncode == 0, err
    assert summary_steps(out) == {name: 60 for name in DEFAULTS["optimizers"]}
    assert all(torch.load(out / f"{n}.ckpt", weights_only=True)["step"] == 60 for n in ("adamw", "lion"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{name}.ckpt" for name in DEFAULTS["optimizers"]), "loss.png", "lr.png", "summary.json"])


def test_a_run_killed_with_sigkill_leaves_no_lock_that_blocks_the_next(tmp_path, capsys):
    """The lock is the kernel's (flock): it goes with the process, however it ends. The next run
    takes the folder, and removes temporary files a killed writer left (its own are unique)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*DEMO, *LONG, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "lion.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    assert (out / ".demo.lock").exists()  # its file is left behind, its lock is not
    (out / f"adamw.ckpt.{proc.pid}.0badcafe.tmp").write_bytes(b"cut short")
    assert cli.main(["demo", "--resume", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert summary_steps(out) == {name: 60 for name in DEFAULTS["optimizers"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{name}.ckpt" for name in DEFAULTS["optimizers"]), "loss.png", "lr.png", "summary.json"])


def test_a_checkpoint_write_leaves_other_writers_temporary_files_alone(tmp_path):
    """save_atomic wrote every checkpoint through the one name NAME.ckpt.tmp: a second writer truncated the
    first's file and renamed it away under it. Each writer now has its own."""
    from optimizer.demo.train import save_atomic

    theirs = [tmp_path / "adamw.ckpt.tmp", tmp_path / "adamw.ckpt.1.01234567.tmp"]
    for path in theirs:
        path.write_bytes(b"another writer's")
    save_atomic({"step": 3}, tmp_path / "adamw.ckpt")
    assert torch.load(tmp_path / "adamw.ckpt", weights_only=True) == {"step": 3}
    assert all(p.read_bytes() == b"another writer's" for p in theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adamw.ckpt", *(p.name for p in theirs)])


@pytest.fixture
def unwritable(tmp_path):
    """A function that makes a folder unwritable for this process, even as root (chattr +i), or skips."""
    made = []

    def make(folder):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        try:
            (folder / "probe").touch()
        except PermissionError:
            return folder
        (folder / "probe").unlink()  # root: permissions do not stop it
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("cannot make a folder unwritable here")
        return folder

    yield make
    for folder in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys, unwritable):
    """An existing (empty) --out that cannot be written was found at the first checkpoint, after
    training, with exit 1 and no flag named; now before anything (a new run, a resume; a new folder
    that cannot be created in it), exit 2 naming --out."""
    empty = unwritable(tmp_path / "empty")
    small = tmp_path / "small"
    assert cli.main(["demo", "--steps", "12", *TINY, "--stop-after", "3", "--out", str(small)]) == 0
    before = files(small)
    unwritable(small)
    capsys.readouterr()
    for argv, words in ((["--steps", "12", *TINY, "--out", str(empty)],
                         f"Invalid --out: cannot write in {str(empty)!r}"),
                        (["--resume", "--out", str(small)], f"Invalid --out: cannot write in {str(small)!r}"),
                        (["--steps", "12", *TINY, "--out", str(empty / "new")],
                         f"Invalid --out: cannot create {str(empty / 'new')!r}")):
        assert cli.main(["demo", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and words in captured.err, captured.err
        assert "you can write to" in captured.err and captured.out == ""  # nothing ran
    assert list(empty.iterdir()) == [] and files(small) == before


def _set(key, value):
    return lambda ckpt: ckpt.update({key: value})


def _set_in(part, key, value):
    return lambda ckpt: ckpt[part].update({key: value})


NOT_FITTING = {
    "model emptied": (_set("model", {}), "its model lacks 'embed.weight'"),
    "a model tensor of another shape": (_set_in("model", "embed.weight", torch.zeros(3, 3)),
                                        "its model's embed.weight is (3, 3), where its settings make"),
    "step not a number": (_set("step", "x"), "its step is 'x' (expected a whole number in [0, its steps 12])"),
    "step past its history": (_set("step", 5), "its history holds 3 steps, its step is 5"),
    "config steps as text": (_set_in("config", "steps", "12"), "its config's steps is '12' (expected a whole number"),
    "config dim a float": (_set_in("config", "dim", 32.5), "its config's dim is 32.5"),
    "config not a dict": (_set("config", [1]), "its config is list, not a dict of settings"),
    "optimizer of no groups": (_set_in("optimizer", "param_groups", []), "its model and optimizer states do not load"),
    "scheduler at a negative step": (_set_in("scheduler", "last_epoch", -5),
                                     "its scheduler state does not load (ValueError: Invalid state_dict for "
                                     "ScheduleLR: 'last_epoch' is -5"),
    "a random state that is not one": (_set("data_rng", torch.zeros(3)), "its data_rng is not a random generator's"),
}


@pytest.mark.parametrize("damage", list(NOT_FITTING))
def test_a_checkpoint_that_loads_but_does_not_fit_is_one_line_before_training(small_run, capsys, damage):
    """A checkpoint that torch.load reads but whose contents do not fit (issue 27: its model emptied, its
    step not a number) gave a 20-line traceback, exit 1, after the other optimizer had trained. Each
    checkpoint's contents are now checked before any run starts: one line naming the file and what is
    wrong, exit 2, nothing written."""
    change, words = NOT_FITTING[damage]
    path = small_run / "lion.ckpt"  # the second optimizer's: adamw would have trained first
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    before = files(small_run)
    capsys.readouterr()
    assert cli.main(["demo", "--resume", "--out", str(small_run)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"Invalid --resume: the checkpoint {path} cannot be resumed: {words}" in err, err
    assert "delete it to run lion again from step 0, or start over with --overwrite" in err
    assert files(small_run) == before and "resuming" not in captured.out


def test_resume_compares_muons_options_by_the_values_the_run_used(tmp_path, capsys):
    """Muon's adamw_lr is a registry option (3e-3), not a class default (None): a resume that names
    the value the run used continues, another value is refused naming the checkpoint's value."""
    out, config = tmp_path / "run", tmp_path / "c.yaml"
    assert cli.main(["demo", "--steps", "8", *TINY, "--optimizers", "muon", "--stop-after", "2",
                     "--out", str(out)]) == 0
    config.write_text("optimizer_args:\n  muon: {adamw_lr: 1e-3}\n")
    capsys.readouterr()
    assert cli.main(["demo", "--resume", "--out", str(out), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"Invalid --resume: optimizer_args.muon.adamw_lr in {config} 0.001 differs from the checkpoint" in err, err
    assert "(it has optimizer_args.muon.adamw_lr 0.003)" in err and len(err.strip().splitlines()) == 1
    config.write_text("optimizer_args:\n  muon: {adamw_lr: 3e-3}\n")  # the value the run used
    assert cli.main(["demo", "--resume", "--out", str(out), "--config", str(config)]) == 0
    assert "muon: resuming at step 2 of 8" in capsys.readouterr().out
