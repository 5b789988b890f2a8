"""Rewrite the README's demo table from the summaries of demo runs that differ only in their seed.

    python tools/demo_table.py [--check] [--root DIR] [RUN_DIR ...]

A repository script, not part of the installed package. Given the output folders of runs of
``python -m optimizer demo`` (the default settings but ``--seed``), it keeps what the table needs
of each ``summary.json`` in ``docs/bench/demo/runs.json`` (checked in: the table can be rewritten
without the runs), with the machine (and its thread count) and torch of the process running this script
(run it where the runs ran) and the summaries' date. Then the block between
``<!-- demo:table -->`` and ``<!-- /demo:table -->`` of README.md is written from that file: per
optimizer its peak lr, its held-out loss at the first seed, and the mean and range over all the
seeds, which is the seed-to-seed spread a one-seed comparison has to beat. With ``--check``
nothing is written: exit 1 where the table differs from what the JSON gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = pathlib.Path("docs") / "bench" / "demo" / "runs.json"
START, END = "<!-- demo:table -->", "<!-- /demo:table -->"
KEEP = ("held_out_loss", "final_train_loss", "peak_lrs", "tokens_per_s", "state_bytes")  # of each result
SAME = ("steps", "batch_size", "seq_len", "dim", "layers", "heads", "schedule", "warmup_steps", "optimizers",
        "optimizer_args", "state_dtype", "param_dtype")  # settings the runs must share


class Refused(Exception):
    """A mistake of the caller's: one line, exit 2."""


def collect(dirs: list[pathlib.Path]) -> dict[str, Any]:
    """runs.json's contents from the runs' folders (the first one's seed is the table's own)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from optimizer.bench import machine
    from optimizer.demo.train import describe_lrs

    runs, settings, dates = [], None, []
    for d in dirs:
        path = d / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise Refused(f"{path}: {err}") from None
        cfg = summary["config"]
        mine = {k: cfg.get(k) for k in SAME}
        if settings is not None and mine != settings:
            differ = sorted(k for k in SAME if mine[k] != settings[k])
            raise Refused(f"{path}: its run differs from {dirs[0]}'s in {differ}, not in its seed only")
        settings = mine
        runs.append({"seed": cfg["seed"], "lrs": describe_lrs(cfg, summary["results"]),
                     "results": {n: {k: r[k] for k in KEEP} for n, r in summary["results"].items()}})
        dates.append(datetime.date.fromtimestamp(path.stat().st_mtime).isoformat())
    if len({r["seed"] for r in runs}) != len(runs):
        raise Refused("two of the runs have the same seed")
    return {"settings": settings, "runs": runs, "date": max(dates), "machine": machine(torch.device("cpu")),
            "torch": torch.__version__}


def table(data: dict[str, Any]) -> str:
    runs = data["runs"]
    first, seeds = runs[0], [r["seed"] for r in runs]
    s = data["settings"]
    spread = f"seeds {', '.join(map(str, seeds))}: mean (min-max)"
    lines = [f"| optimizer | peak lr | held-out loss, seed {first['seed']} | held-out loss, {spread} | "
             "train loss | tokens/s | state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in first["results"].items():
        held = [run["results"][name]["held_out_loss"] for run in runs]
        peaks = " / ".join(f"{v:g}" for v in r["peak_lrs"].values())
        lines.append(f"| {name} | {peaks} | {r['held_out_loss']:.3f} | {statistics.fmean(held):.3f} "
                     f"({min(held):.3f}-{max(held):.3f}) | {r['final_train_loss']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['state_bytes'] / 2**20:.2f} |")
    widest = max(max(held) - min(held) for held in
                 ([run["results"][n]["held_out_loss"] for run in runs] for n in first["results"]))
    lines += ["", f"{s['steps']} steps of {s['batch_size']}x{s['seq_len']} bytes, a {s['dim']}x{s['layers']} model, "
              f"{s['schedule']} schedule with warmup {s['warmup_steps']}; {first['lrs']}. Losses in nats per byte "
              "(held-out: the last 10% of the text; train: the mean of the last 10 steps). Between seeds the "
              f"held-out loss of one optimizer moved by up to {widest:.3f}: a gap between optimizers smaller than "
              "that is not a result. From [runs.json](docs/bench/demo/runs.json): measured "
              f"{data['date']} on {data['machine']}, torch {data['torch']}, with "
              f"`python -m optimizer demo --seed S` for S in {', '.join(map(str, seeds))}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/demo_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", type=pathlib.Path,
                        help="the --out folders of demo runs that differ in --seed only; the first one's is the "
                             "table's own")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the table is not its JSON's")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="the repository (default: this clone)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    readme, runs_json = root / "README.md", root / RUNS
    try:
        if args.check and args.runs:
            raise Refused("--check reads docs/bench/demo/runs.json only; give no runs with it")
        if args.runs:
            data = collect(args.runs)
            runs_json.parent.mkdir(parents=True, exist_ok=True)
            runs_json.write_text(json.dumps(data, indent=1) + "\n")
            print(f"wrote {RUNS}")
        elif not runs_json.exists():
            return 0  # nothing measured yet: the block keeps its text
        data = json.loads(runs_json.read_text())
        text = readme.read_text()
        if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
            raise Refused(f"README.md: the {START} and {END} markers do not pair once each")
    except Refused as err:
        print(f"demo_table.py: error: {err}", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    new = head + START + "\n" + table(data) + "\n" + END + rest.split(END, 1)[1]
    if new == text:
        return 0
    if args.check:
        print("demo_table.py: the README's demo table differs from docs/bench/demo/runs.json; run "
              "python tools/demo_table.py", file=sys.stderr)
        return 1
    readme.write_text(new)
    print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
