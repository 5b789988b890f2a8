"""Rewrite the measured tables of README.md and docs/*.md from the bench's JSON files.

    python tools/bench_tables.py [--check] [--root DIR] [[NAME=]FILE ...]

A repository script, not part of the installed package. Each table sits between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and is written from ``docs/bench/NAME.json``,
a file that ``python -m optimizer bench --json FILE`` wrote. A FILE given here is first copied to
``docs/bench/NAME.json`` (NAME: the file's name without ``.json``, unless written ``NAME=FILE``),
so the JSON behind every table stays checked in. Then every marked table whose JSON exists is
rewritten from it, and the README's headline table (``<!-- bench:headline -->``) is composed from
the rows listed in ``HEADLINE``. A marked block without a JSON (the GPU table, not measured yet)
keeps its text. With ``--check`` nothing is written: the exit code is 1 where a table differs from
what its JSON gives (a table edited by hand, or a JSON changed without its table).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this clone, installed or not

from optimizer.bench import load_results, markdown  # noqa: E402 - after the path above

# The headline table: (our row, the row it is compared with, the JSON both come from).
HEADLINE = [
    ("ours AdamW default", "torch AdamW fused", "cpu-gpt2-30m"),
    ("ours Lion default", "torch AdamW fused", "cpu-gpt2-30m"),
    ("ours Lion default", "lion-pytorch", "cpu-gpt2-30m"),
    ("ours AdamW 8-bit", "torch AdamW fused", "cpu-8bit"),
    ("ours Lion 8-bit", "torch AdamW fused", "cpu-8bit"),
    ("ours AdamW 8-bit", "bitsandbytes AdamW8bit", "cpu-8bit"),
    ("ours AdamW 8-bit", "torchao AdamW8bit", "cpu-8bit"),
    ("ours Lion 8-bit", "bitsandbytes Lion8bit", "cpu-8bit"),
    ("ours SparseAdamW default", "torch AdamW fused (dense)", "cpu-sparse"),
    ("ours SparseAdamW default", "torch SparseAdam", "cpu-sparse"),
    ("ours Muon default", "torch Muon + AdamW fused", "cpu-muon"),
    ("ours Muon default", "torch Muon + AdamW fused", "cpu-muon-many-small"),
]
HEADLINE_NAME = "headline"
MARKER = re.compile(r"^<!-- (/?)bench:([\w-]+) -->$", re.M)


class Refused(Exception):
    """A mistake of the caller's: one line, exit 2."""


def documents(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def blocks(path: pathlib.Path, text: str) -> list[str]:
    """The names of ``text``'s marked blocks, in order; each must open once and close after."""
    names, open_name = [], None
    for m in MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing and open_name is None and name not in names:
            open_name = name
        elif closing and name == open_name:
            names.append(name)
            open_name = None
        else:
            raise Refused(f"{path}: the <!-- bench:{name} --> markers do not pair once each")
    if open_name is not None:
        raise Refused(f"{path}: <!-- bench:{open_name} --> has no <!-- /bench:{open_name} -->")
    return names


def _row(results: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    for r in results:
        for row in r["rows"]:
            if row["name"] == name:
                return r, row
    return None


def _workload(r: dict[str, Any]) -> str:
    if r.get("kind") == "sparse":
        return f"`{r['model']}` ({r['touched_rows'] / r['table_rows']:.0%} of its rows a step)"
    return f"`{r['model']}` ({r['params'] / 1e6:.1f} M {r['dtype']})"


def _state(row: dict[str, Any]) -> str:
    held = row.get("state_bytes_per_param")
    return "-" if held is None else f"{held:.2f}"


def headline(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Our rows against the peers', each pair from one run, with the runs' dates, machines and commands."""
    lines = ["| ours | against | workload | ours ms/step | theirs ms/step | time, ours / theirs "
             "| state B/param, ours / theirs |",
             "|---|---|---|---:|---:|---:|---:|"]
    used: list[str] = []
    for ours, theirs, source in HEADLINE:
        a, b = _row(runs.get(source, []), ours), _row(runs.get(source, []), theirs)
        if a is None or b is None:  # a run not made yet, or a peer not installed where it was made
            missing = "no such file" if source not in runs else f"no row {ours if a is None else theirs!r}"
            print(f"bench_tables.py: headline: {ours} against {theirs} left out (docs/bench/{source}.json: "
                  f"{missing})", file=sys.stderr)
            continue
        (r, mine), (_, peer) = a, b
        lines.append(f"| {ours.removeprefix('ours ')} | {theirs} | {_workload(r)} | {mine['ms']:.2f} | "
                     f"{peer['ms']:.2f} | {mine['ms'] / peer['ms']:.2f}x | {_state(mine)} / {_state(peer)} |")
        used += [source] if source not in used else []
    lines.append("")
    for source in used:
        footer = markdown(runs[source]).splitlines()[-1]  # "Measured DATE on MACHINE (...) with `...`; ..."
        lines.append(f"From [{source}.json](docs/bench/{source}.json): {footer[0].lower()}{footer[1:]}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def render(text: str, tables: dict[str, str]) -> str:
    """``text`` with the block of each name in ``tables`` replaced."""
    for name, table in tables.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if start in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_tables.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", metavar="[NAME=]FILE",
                        help="JSON written by python -m optimizer bench --json; copied to docs/bench/NAME.json")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table is not its JSON's")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="the repository (default: this clone)")
    args = parser.parse_args(argv)
    root, bench_dir = args.root.resolve(), args.root.resolve() / "docs" / "bench"
    try:
        docs = {p: p.read_text() for p in documents(root)}
        names = {name for p, text in docs.items() for name in blocks(p.relative_to(root), text)}
        given = {}
        for spec in args.files:
            name, _, path = spec.rpartition("=")
            name = name or pathlib.Path(path).name.removesuffix(".json")
            if not re.fullmatch(r"[\w-]+", name) or name == HEADLINE_NAME:
                raise Refused(f"invalid table name {name!r} for {path} (letters, digits, - and _; not "
                              f"{HEADLINE_NAME!r}); write NAME=FILE")
            if name not in names and name not in {s for *_, s in HEADLINE}:
                raise Refused(f"no <!-- bench:{name} --> table in README.md or docs/*.md for {path}; "
                              "write NAME=FILE with the name of a table")
            try:
                load_results(path)
            except OSError as err:
                raise Refused(f"{path}: {err.strerror}") from None
            except ValueError as err:
                raise Refused(str(err)) from None
            given[name] = pathlib.Path(path)
        if args.check and given:
            raise Refused("--check reads the JSON in docs/bench only; give no files with it")
        for name, path in given.items():
            dest = bench_dir / f"{name}.json"
            if path.resolve() != dest.resolve():
                bench_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                print(f"copied {path} to {dest.relative_to(root)}")
        runs = {p.name.removesuffix(".json"): load_results(str(p)) for p in sorted(bench_dir.glob("*.json"))}
    except Refused as err:
        print(f"bench_tables.py: error: {err}", file=sys.stderr)
        return 2
    tables = {name: markdown(results) for name, results in runs.items() if name in names}
    if HEADLINE_NAME in names:
        tables[HEADLINE_NAME] = headline(runs)
    stale = []
    for path, text in docs.items():
        new = render(text, tables)
        if new == text:
            continue
        rel = path.relative_to(root)
        if args.check:
            stale.append(str(rel))
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(path)
        print(f"updated {rel}")
    if stale:
        print(f"bench_tables.py: tables differ from docs/bench/*.json in {', '.join(stale)}; "
              "run python tools/bench_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
