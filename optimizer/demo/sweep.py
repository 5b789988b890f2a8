"""``python -m optimizer sweep``: the held-out loss of short demo runs against the learning rate,
per optimizer, on a log grid around its registry default; the best lr of each and the lrs
within 2% of it; ``sweep.json`` (every run) and ``sweep.png``.

Each run is :func:`optimizer.demo.train.train_one` (the demo's model, data, schedule and loop)
at one optimizer, lr and seed, without checkpoints, stopped as soon as it diverges
(:func:`optimizer.demo.train.diverged`). A run is short, so an unfinished one is not kept:
Ctrl-C (or SIGTERM) writes the finished runs, and ``--resume`` runs only those not yet in
``sweep.json``. Runs go to ``--jobs`` processes (spawned: a forked child would inherit torch's
thread pool), the CPU threads shared between them."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import pathlib
import signal
import statistics
import sys
import textwrap
import time
from typing import Any

import torch

from ..factory import OPTIMIZERS, ConfigError
from . import parallel, train
from .data import load_text, split

# the registry lr times these: two points per factor of two, about three per factor of ten
GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
# Every setting of a sweep with its default; the model and data are the demo's, the runs shorter
DEFAULTS: dict[str, Any] = {
    "optimizers": list(train.DEFAULTS["optimizers"]),
    "lrs": {},  # name -> [lr, ...]; an optimizer not here gets its registry lr times GRID
    "seeds": 1,  # runs per point, seeds seed, seed + 1, ...
    "seed": 0,
    "steps": 100,
    "schedule": train.DEFAULTS["schedule"],
    **{k: train.DEFAULTS[k] for k in ("batch_size", "seq_len", "dim", "layers", "heads")},
    "out": "runs/sweep",
}
# the settings a run depends on: a resumed sweep must have the sweep.json's (the grid may grow)
RUN_KEYS = ("steps", "schedule", "batch_size", "seq_len", "dim", "layers", "heads")
GRID_KEYS = ("optimizers", "lrs", "seeds", "seed")
FILES = ("sweep.json", "sweep.png")
WITHIN = 0.02  # the "good range": the lrs whose held-out loss is within 2% of the best's


def grid(name: str) -> list[float]:
    """The default lrs of optimizer ``name``: its registry lr times :data:`GRID`."""
    return [OPTIMIZERS[name].lr * f for f in GRID]


def lrs_of(settings: dict[str, Any]) -> dict[str, list[float]]:
    return {n: sorted(settings["lrs"].get(n) or grid(n)) for n in settings["optimizers"]}


def run_config(settings: dict[str, Any], name: str, lr: float, seed: int) -> dict[str, Any]:
    """The demo's settings of one run: the sweep's sizes, ``name`` at peak lr ``lr`` (Muon's is its
    matrices', its AdamW keeps the registry's), seed ``seed``, the held-out loss at the end only."""
    cfg = copy.deepcopy(train.DEFAULTS)
    cfg.update({k: settings[k] for k in RUN_KEYS}, optimizers=[name], seed=seed, out=settings["out"],
               optimizer_args={name: {"lr": lr}}, eval_every=settings["steps"], checkpoint_every=settings["steps"])
    return train.resolve_defaults(cfg)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def run_point(settings: dict[str, Any], name: str, lr: float, seed: int, threads: int,
              interrupt: train.Interrupt | None = None) -> dict[str, Any] | None:
    """Train one point of the sweep; its record, or None when ``interrupt`` stopped it."""
    torch.set_num_threads(threads)
    cfg = run_config(settings, name, lr, seed)
    train_data, held_out = split(load_text()[0])
    start = time.perf_counter()
    r = train.train_one(name, cfg, train_data, held_out, pathlib.Path(settings["out"]), ckpt=None, stop_after=None,
                        progress=False, interrupt=interrupt or train.Interrupt(), world=parallel.World(),
                        device=torch.device("cpu"), save=False, stop_if_diverged=True)
    if not r["finished"]:
        return None
    held = r["held_out_loss"]
    return {"optimizer": name, "lr": lr, "seed": seed, "final_train_loss": _finite(r["final_train_loss"]),
            "held_out_loss": _finite(held), "diverged": r["diverged"] or not math.isfinite(held),
            "steps_done": r["steps_done"], "seconds": time.perf_counter() - start, "threads": threads,
            "tokens_per_s": r["tokens_per_s"], "loss": [_finite(x) for x in r["history"]["loss"]]}


def _worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    torch.set_num_threads(threads)


def key(record: dict[str, Any]) -> tuple[str, float, int]:
    return record["optimizer"], record["lr"], record["seed"]


def points(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs summed up per optimizer and lr (over seeds), in increasing lr: ``lr``, ``held_out`` (the
    mean over the seeds that did not diverge; None if all did), ``low``/``high`` (their range),
    ``train``, ``diverged`` (how many seeds did) and ``seeds``."""
    by: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in runs:
        by.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, lrs in by.items():
        out[name] = []
        for lr in sorted(lrs):
            rs = lrs[lr]
            ok = [r for r in rs if not r["diverged"]]
            held = [r["held_out_loss"] for r in ok]
            out[name].append({"lr": lr, "seeds": len(rs), "diverged": len(rs) - len(ok),
                              "held_out": statistics.fmean(held) if held else None,
                              "low": min(held) if held else None, "high": max(held) if held else None,
                              "train": statistics.fmean([r["final_train_loss"] for r in ok]) if ok else None})
    return out


def best(pts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best point of one optimizer (lowest mean held-out loss among the lrs where no seed diverged)
    and the contiguous range of lrs around it within :data:`WITHIN` of its loss; ``edge`` says when the
    best is the grid's smallest or largest lr (the true best may lie outside)."""
    fine = [i for i, p in enumerate(pts) if not p["diverged"]]
    if not fine:
        return None
    i = min(fine, key=lambda j: pts[j]["held_out"])
    limit = pts[i]["held_out"] * (1 + WITHIN)
    lo = hi = i
    while lo > 0 and not pts[lo - 1]["diverged"] and pts[lo - 1]["held_out"] <= limit:
        lo -= 1
    while hi < len(pts) - 1 and not pts[hi + 1]["diverged"] and pts[hi + 1]["held_out"] <= limit:
        hi += 1
    edge = "smallest" if i == 0 else "largest" if i == len(pts) - 1 else None
    return {"lr": pts[i]["lr"], "held_out": pts[i]["held_out"], "within": [pts[lo]["lr"], pts[hi]["lr"]],
            "edge": edge}


def read(path: pathlib.Path, flag: str) -> dict[str, Any]:
    """A sweep.json, checked enough to be read: one line naming ``flag`` if it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Invalid {flag}: {str(path)!r} does not exist; run python -m optimizer sweep "
                          "first") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"Invalid {flag}: {str(path)!r} is not a sweep's JSON ({err})") from None
    ok = isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("runs"), list)
    fields = {"optimizer": str, "lr": float, "seed": int, "diverged": bool}
    if not ok or not all(isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in fields.items())
                         and (r["diverged"] or isinstance(r.get("held_out_loss"), float)) for r in data["runs"]):
        raise ConfigError(f"Invalid {flag}: {str(path)!r} is not a sweep's JSON (python -m optimizer sweep "
                          "writes it)")
    return data


def best_lrs(path: str | pathlib.Path, optimizers: list[str], flag: str = "--lr-from") -> dict[str, float]:
    """Each of ``optimizers``' best lr in the sweep ``path`` (``demo --lr-from``); one line naming
    ``flag`` when the file is not a sweep or has no run of one of them that did not diverge."""
    path = pathlib.Path(path)
    pts = points(read(path, flag)["runs"])
    found = {}
    for name in optimizers:
        b = best(pts.get(name, []))
        if b is None:
            raise ConfigError(f"Invalid {flag}: {str(path)!r} has no run of {name} that did not diverge; sweep it "
                              f"(python -m optimizer sweep --optimizers {name}) or leave it out of --optimizers")
        found[name] = b["lr"]
    return found


def describe(settings: dict[str, Any], params: int | None = None) -> str:
    """The runs' settings in a line (the output's and the figure's)."""
    cfg = run_config(settings, settings["optimizers"][0], 1.0, settings["seed"])
    size = f", {params / 1e6:.2f} M parameters" if params else ""
    seeds = settings["seed"] + settings["seeds"] - 1
    seeds = f"seed {settings['seed']}" if settings["seeds"] == 1 else f"seeds {settings['seed']}-{seeds}"
    return (f"small LLaMA{size} ({cfg['dim']}x{cfg['layers']}, {cfg['heads']} heads), {cfg['steps']} steps of "
            f"{cfg['batch_size']}x{cfg['seq_len']} bytes (the demo's default: {train.DEFAULTS['steps']}), "
            f"{cfg['schedule']} schedule, warmup {cfg['warmup_steps']}, {seeds}")


def _fmt(x: float | None, width: int) -> str:
    return f"{'-':>{width}s}" if x is None else f"{x:{width}.3f}"


def table(runs: list[dict[str, Any]], seeds: int) -> str:
    """The table: one row per optimizer and lr (over seeds: the mean held-out loss and its spread), then
    each optimizer's best lr and the lrs within 2% of it."""
    pts = points(runs)
    many = any(p["seeds"] > 1 for ps in pts.values() for p in ps)
    head = f"{'optimizer':10s} {'lr':>9s} {'train loss':>10s} {'held-out':>9s}"
    head += f" {'spread':>7s} {'diverged':>8s}" if many else f" {'diverged':>8s}"
    lines = [head]
    for name, ps in pts.items():
        for p in ps:
            row = f"{name:10s} {p['lr']:9.3g} {_fmt(p['train'], 10)} {_fmt(p['held_out'], 9)}"
            if many:
                spread = None if p["high"] is None else p["high"] - p["low"]
                row += f" {_fmt(spread, 7)} {p['diverged']:>4d}/{p['seeds']:<3d}"
            else:
                row += f" {'yes' if p['diverged'] else 'no':>8s}"
            lines.append(row)
    held = "the mean held-out loss over the seeds" if many else "the held-out loss"
    lines += ["losses in nats per byte at the end of each run; train loss: the mean of the last 10 steps'"
              + ("; spread: the largest minus the smallest seed's held-out loss" if many else ""),
              "a run has diverged when its loss is not finite or, after warmup, above its start: it stopped there",
              f"best lr ({held}, among the lrs where no run diverged) and the lrs within {WITHIN:.0%} of it:"]
    for name, ps in pts.items():
        b = best(ps)
        if b is None:
            lines.append(f"  {name:8s} every run diverged: try smaller --lrs")
            continue
        lo, hi = b["within"]
        span = f"{lo:.3g} to {hi:.3g}" if lo != hi else f"{lo:.3g} only"
        edge = (f"; the {b['edge']} lr swept: the best may lie beyond, add "
                f"{'smaller' if b['edge'] == 'smallest' else 'larger'} --lrs") if b["edge"] else ""
        lines.append(f"  {name:8s} best lr {b['lr']:.3g} (held-out {b['held_out']:.3f}); within {WITHIN:.0%}: "
                     f"{span}{edge}")
    return "\n".join(lines)


def figure(runs: list[dict[str, Any]], settings: dict[str, Any], params: int | None = None):
    """Held-out loss against lr (log axis), one curve per optimizer (the mean over seeds, the band their
    range, a dot per seed), each best point starred, diverged runs drawn at the top edge."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(8, 5))
    top = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes: the top edge
    labelled = False
    for name, ps in points(runs).items():
        ok = [p for p in ps if p["held_out"] is not None]
        line, = ax.plot([p["lr"] for p in ok], [p["held_out"] for p in ok], "o-", ms=4, label=name)
        color = line.get_color()
        if any(p["seeds"] > 1 for p in ok):
            ax.fill_between([p["lr"] for p in ok], [p["low"] for p in ok], [p["high"] for p in ok], color=color,
                            alpha=0.2, lw=0)
            seeds = [r for r in runs if r["optimizer"] == name and not r["diverged"]]
            ax.plot([r["lr"] for r in seeds], [r["held_out_loss"] for r in seeds], ".", color=color, ms=3, alpha=0.6)
        b = best(ps)
        if b is not None:
            ax.plot([b["lr"]], [b["held_out"]], "*", color=color, ms=16, mec="black", mew=0.6, zorder=5)
            ax.annotate(f"{b['lr']:.3g}", (b["lr"], b["held_out"]), textcoords="offset points", xytext=(0, -16),
                        ha="center", fontsize=8, color=color)
            line.set_label(f"{name}: best lr {b['lr']:.3g}, held-out {b['held_out']:.3f}")
        blown = [p["lr"] for p in ps if p["diverged"]]
        if blown:
            ax.plot(blown, [0.97] * len(blown), "x", color=color, ms=9, mew=2, transform=top, clip_on=False,
                    label=None if labelled else "diverged (drawn at the top edge)")
            labelled = True
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate (log scale)", ylabel="held-out loss at the end (nats / byte)")
    ax.plot([], [], "*", color="gray", ms=12, mec="black", mew=0.6, label="best lr of each")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.12)  # room for the best points' labels below them
    seeds = " (mean over seeds; band: their range)" if settings["seeds"] > 1 else ""
    muon = (f"; muon's lr is its matrices' (its AdamW stays at {OPTIMIZERS['muon'].options['adamw_lr']:g})"
            if any(r["optimizer"] == "muon" for r in runs) else "")
    # a title the figure can hold: wrapped to its width
    ax.set_title(textwrap.fill(f"lr sweep{seeds}: {describe(settings, params)}{muon}; lower is better", 120,
                               break_long_words=False), fontsize=8)
    fig.tight_layout()
    return fig


def _write(out: pathlib.Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """sweep.json, written whole or not at all (a temporary file, then a rename)."""
    path = out / "sweep.json"
    tmp = path.with_name(f"sweep.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"config": settings, "runs": runs}, indent=1))
    os.replace(tmp, path)


def run(settings: dict[str, Any], runs: list[dict[str, Any]], *, jobs: int, threads: int) -> int:
    """Run every point of ``settings``' grid not in ``runs`` (the finished ones of an earlier
    invocation), writing sweep.json after each; then the table and sweep.png. Returns the exit
    code: 0, or 128 + the signal's number when SIGINT / SIGTERM stopped it."""
    out = pathlib.Path(settings["out"])
    done = {key(r) for r in runs}
    seeds = range(settings["seed"], settings["seed"] + settings["seeds"])
    todo = [(n, lr, s) for n, lrs in lrs_of(settings).items() for lr in lrs for s in seeds if (n, lr, s) not in done]
    params = sum(p.numel() for p in train._model(run_config(settings, "adamw", 1.0, 0), torch.device("cpu"))
                 .parameters())
    total = len(todo) + len(runs)
    print(f"lr sweep: {describe(settings, params)}")
    how = f"{jobs} processes x {threads} thread{'s' * (threads > 1)}" if jobs > 1 else \
        f"1 process x {threads} thread{'s' * (threads > 1)}"
    print(f"{len(todo)} runs to do ({len(runs)} done already), {how}; writing {out / 'sweep.json'} after each")
    start = time.perf_counter()

    def finished(record: dict[str, Any]) -> None:
        runs.append(record)
        _write(out, settings, runs)
        result = (f"diverged at step {record['steps_done']}" if record["diverged"] else
                  f"held-out {record['held_out_loss']:.3f}, train {record['final_train_loss']:.3f}")
        print(f"[{len(runs)}/{total}] {record['optimizer']} lr {record['lr']:.3g} seed {record['seed']}: {result} "
              f"({record['seconds']:.0f} s)", flush=True)

    _write(out, settings, runs)
    with train.Interrupt() as interrupt:
        if jobs == 1:
            for point in todo:
                record = run_point(settings, *point, threads, interrupt=interrupt)
                if record is None or interrupt.signum is not None:
                    break
                finished(record)
        else:
            pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker, initargs=(threads,))
            try:
                pending = [pool.apply_async(run_point, (settings, *p, threads)) for p in todo]
                while pending and interrupt.signum is None:
                    ready = [a for a in pending if a.ready()]
                    for a in ready:
                        pending.remove(a)
                        finished(a.get())
                    if not ready:
                        time.sleep(0.2)
            finally:
                pool.terminate()  # an interrupted run is short: it starts again on --resume
                pool.join()
        if interrupt.signum is not None:
            name = signal.Signals(interrupt.signum).name
            print(f"{name}: {len(runs)} of {total} runs done, in {out / 'sweep.json'}; continue with: "
                  f"python -m optimizer sweep --resume --out {out}", file=sys.stderr)
            return 128 + interrupt.signum
    print(f"\n{total} runs, {len(todo)} of them now in {time.perf_counter() - start:.0f} s ({how})")
    print(table(runs, settings["seeds"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(runs, settings, params)
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'sweep.png'}, {out / 'sweep.json'}; train each at its best lr with: "
          f"python -m optimizer demo --lr-from {out / 'sweep.json'}")
    return 0
