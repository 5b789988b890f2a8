"""`python -m optimizer sweep`: every run on the same initialisation and batches, the best lr the
lowest held-out loss of the runs, a diverged run stopped early and recorded, Ctrl-C keeps the
finished runs and --resume skips them, `demo --lr-from` trains at the sweep's best, and every
error is one line naming the flag."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from helpers import fails

from optimizer import cli
from optimizer.demo import sweep, train

pytest.importorskip("matplotlib")

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--steps", "12"]
SWEEP = [sys.executable, "-m", "optimizer", "sweep"]


def runs(out) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["runs"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished sweep of adamw and lion, three lrs each, and what it printed."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    done = subprocess.run([*SWEEP, "--optimizers", "adamw", "lion", "--lrs", "adamw=1e-3,3e-3,1e-2",
                           "lion=1e-4,3e-4,1e-3", *TINY, "--jobs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_every_run_starts_from_the_same_model_and_batches_and_the_best_is_the_lowest(swept):
    out, printed = swept
    rs = runs(out)
    assert sorted((r["optimizer"], r["lr"]) for r in rs) == sorted(
        [("adamw", lr) for lr in (1e-3, 3e-3, 1e-2)] + [("lion", lr) for lr in (1e-4, 3e-4, 1e-3)])
    assert len({r["loss"][0] for r in rs}) == 1  # the first loss: before any update, on the same batch
    assert len({r["loss"][1] for r in rs}) == len(rs)  # each lr made its own first update
    for name in ("adamw", "lion"):
        mine = [r for r in rs if r["optimizer"] == name and not r["diverged"]]
        lowest = min(mine, key=lambda r: r["held_out_loss"])
        assert f"{name:8s} best lr {lowest['lr']:.3g} (held-out {lowest['held_out_loss']:.3f})" in printed, printed
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "12 steps of 4x32 bytes" in printed  # the sizes, said in the output


def test_best_takes_the_lowest_loss_where_no_seed_diverged_and_the_range_within_two_percent():
    def pt(lr, held, diverged=0):
        return {"lr": lr, "held_out": held, "diverged": diverged, "seeds": 1}

    pts = [pt(1, 2.0), pt(2, 1.55), pt(4, 1.52), pt(8, 1.50), pt(16, 1.40, diverged=1), pt(32, 1.51)]
    b = sweep.best(pts)
    assert b["lr"] == 8 and b["within"] == [4, 8] and b["edge"] is None  # 1.55 > 1.53; 16 diverged: the range ends
    assert sweep.best(pts[:4])["edge"] == "largest" and sweep.best(pts[3:4])["within"] == [8, 8]
    assert sweep.best([pt(1, 3.0, diverged=1)]) is None


def test_divergence_is_a_non_finite_loss_or_after_warmup_a_mean_above_the_start():
    start = [5.5] + [4.0] * 9
    assert train.diverged([*start, math.nan], warmup_steps=30)  # NaN: at once, even in warmup
    assert not train.diverged([*start, *[6.0] * 11], warmup_steps=30)  # a high lr may recover after warmup
    assert train.diverged([*start, *[6.0] * 30], warmup_steps=30)
    assert not train.diverged([*start, *[5.0] * 30], warmup_steps=30)


def test_a_diverging_run_stops_early_and_is_drawn_not_dropped(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(["sweep", "--optimizers", "adamw", "--lrs", "adamw=3e-3,30", *TINY, "--steps", "60",
                     "--jobs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    blown = [r for r in runs(out) if r["lr"] == 30][0]
    assert blown["diverged"] and blown["steps_done"] < 60 and len(blown["loss"]) == blown["steps_done"]
    assert "adamw lr 30 seed 0: diverged at step" in printed
    assert "adamw    best lr 0.003" in printed  # the diverged lr is never the best


def test_two_processes_give_the_runs_one_process_gives(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, jobs in ((one, "1"), (two, "2")):
        assert cli.main(["sweep", "--optimizers", "adamw", "--lrs", "adamw=1e-3,3e-3", *TINY, "--jobs", jobs,
                         "--out", str(out)]) == 0
    a = {r["lr"]: r["held_out_loss"] for r in runs(one)}
    b = {r["lr"]: r["held_out_loss"] for r in runs(two)}
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-3) for k in a)  # 2 threads vs 1: rounding


def test_ctrl_c_keeps_the_finished_runs_and_resume_runs_only_the_others(tmp_path):
    out = tmp_path / "s"
    argv = ["--optimizers", "adamw", "--lrs", "adamw=1e-3,2e-3,3e-3,4e-3,5e-3,6e-3", *TINY, "--steps", "40",
            "--out", str(out)]
    proc = subprocess.Popen([*SWEEP, *argv, "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "sweep.json").exists() and runs(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    kept = runs(out)
    assert 1 <= len(kept) < 6 and f"continue with: python -m optimizer sweep --resume --out {out}" in stderr
    assert not (out / "sweep.png").exists()
    assert cli.main(["sweep", "--resume", "--out", str(out), "--jobs", "1"]) == 0
    after = runs(out)
    assert after[:len(kept)] == kept  # the finished runs are kept as they were, not run again
    assert sorted(r["lr"] for r in after) == [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]
    assert cli.main(["sweep", "--resume", "--out", str(out), "--lrs", "adamw=1e-3,7e-3", "--jobs", "1"]) == 0
    assert runs(out)[:6] == after and [r["lr"] for r in runs(out)[6:]] == [7e-3]  # only the new point


def test_demo_lr_from_trains_each_at_its_swept_best_and_says_so(swept, tmp_path, capsys):
    out, _ = swept
    best = {}
    for r in runs(out):
        if not r["diverged"] and r["held_out_loss"] < best.get(r["optimizer"], (0, math.inf))[1]:
            best[r["optimizer"]] = (r["lr"], r["held_out_loss"])
    demo = tmp_path / "demo"
    assert cli.main(["demo", "--optimizers", "adamw", "lion", "--lr-from", str(out / "sweep.json"), *TINY,
                     "--no-progress", "--out", str(demo)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((demo / "summary.json").read_text())
    for name, (lr, _) in best.items():
        assert summary["config"]["optimizer_args"][name]["lr"] == lr
        assert math.isclose(max(summary["results"][name]["history"]["lr"]), lr)
    assert f"peak lr: each optimizer's best in the lr sweep {out / 'sweep.json'} (--lr-from)" in printed
    assert summary["config"]["lr_from"] == str(out / "sweep.json")


@pytest.mark.parametrize(("argv", "words"), [
    (["--lrs", "adamw=fast"], ["Invalid --lrs: 'adamw=fast'", "numbers"]),
    (["--lrs", "adamw=-1"], ["Invalid --lrs: 'adamw=-1'", "> 0"]),
    (["--lrs", "sgd=1"], ["Invalid --lrs: 'sgd=1'", "adamw"]),
    (["--optimizers", "adamw", "--lrs", "lion=1e-3"], ["Invalid --lrs: 'lion' is not swept", "--optimizers"]),
    (["--seeds", "0"], ["Invalid --seeds: 0"]),
    (["--jobs", "0"], ["Invalid --jobs: 0"]),
    (["--steps", "0"], ["Invalid --steps: 0"]),
    (["--dim", "30"], ["Invalid --dim: 30", "--heads 4"]),
    (["--resume"], ["Invalid --resume:", "does not exist"]),
])
def test_a_bad_flag_is_one_line_naming_it_and_nothing_is_written(tmp_path, capsys, argv, words):
    out = tmp_path / "s"
    err = fails(capsys, "sweep", *argv, "--out", str(out))
    assert all(w in err for w in words), err
    assert not out.exists()


def test_lr_from_and_an_existing_sweep_are_named_when_wrong(swept, tmp_path, capsys):
    out, _ = swept
    err = fails(capsys, "demo", "--lr-from", str(out / "sweep.json"), "--adamw-lr", "1e-3", "--optimizers", "adamw",
                "--out", str(tmp_path / "d"))
    assert "Invalid --adamw-lr: adamw's lr comes from --lr-from" in err, err
    err = fails(capsys, "demo", "--lr-from", str(out / "sweep.json"), "--optimizers", "muon", "--out",
                str(tmp_path / "d"))
    assert "Invalid --lr-from:" in err and "no run of muon" in err, err
    err = fails(capsys, "demo", "--lr-from", str(tmp_path / "none.json"), "--out", str(tmp_path / "d"))
    assert "Invalid --lr-from:" in err and "does not exist" in err, err
    before = (out / "sweep.json").read_bytes()
    err = fails(capsys, "sweep", *TINY, "--out", str(out))
    assert "Invalid --out:" in err and "--resume" in err and "--overwrite" in err, err
    err = fails(capsys, "sweep", "--resume", "--steps", "13", "--out", str(out))
    assert "Invalid --resume: --steps 13 differs from the sweep" in err and "(it has steps 12)" in err, err
    assert (out / "sweep.json").read_bytes() == before
