"""Check the documentation against the code: ``python docs/check_docs.py`` (exit 1 on a problem).

1. Every line of a ```python block in the algorithms guides (docs/algorithms.md and
   docs/zh/algorithms.md) is a verbatim line of the source files they quote, and so is every
   inline quote of a code line in their tables (`return ...`, `gamma = ...`, ...). (Examples a
   reader runs are ```py blocks: tests/test_guides.py runs them.)
2. The two guides are twins: the same sections (heading levels) in the same order, and in each
   pair of sections the same quoted code lines, the same ```text and ```py blocks (the examples'
   comments may be translated), the same number of display formulas, and the same sections marked
   optional ("*Optional.*" opening the English section, "选读" in the Chinese heading).
3. Every relative link in README.md and docs/**.md points to a file that exists, and every
   #anchor to a heading of that file (GitHub's rule: lower case, punctuation dropped, spaces
   to hyphens).
4. README.md keeps exactly two ```bash blocks (the set-up commands), and in README.md and
   docs/benchmarks.md every <!-- bench:NAME --> marker has one <!-- /bench:NAME --> partner.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = ["docs/algorithms.md", "docs/zh/algorithms.md"]
QUOTED = ["optimizer/adamw.py", "optimizer/lion.py", "optimizer/muon.py", "optimizer/schedules.py",
          "optimizer/scheduler.py", "optimizer/_dispatch.py", "optimizer/_8bit.py", "optimizer/_rounding.py"]
INLINE = re.compile(r"`((?:return |gamma = |start = |if step < |args\[)[^`]*)`")


def check_quotes() -> list[str]:
    source = "\n".join((ROOT / f).read_text() for f in QUOTED if (ROOT / f).exists())
    lines = {line.rstrip() for line in source.splitlines()}
    stripped = {line.strip() for line in source.splitlines()}
    problems = []
    for guide in GUIDES:
        text = (ROOT / guide).read_text()
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            problems += [f"{guide}: not a line of {QUOTED}: {line!r}" for line in block.splitlines()
                         if line.strip() and line.rstrip() not in lines]
        problems += [f"{guide}: inline quote not found: {q!r}" for q in INLINE.findall(text)
                     if q.strip() not in stripped]
    return problems


def _sections(text: str) -> list[dict]:
    """The guide cut at its headings (outside code blocks): level, heading and what the section
    holds that its twin must hold too."""
    sections: list[dict] = []
    body: list[str] = []
    fence = None
    for line in text.splitlines() + ["# (end)"]:
        if fence is None and line.startswith("```"):
            fence = line[3:].strip()
        elif fence is not None and line.startswith("```"):
            fence = None
        heading = re.match(r"(#+) (.*)", line) if fence is None else None
        if heading:
            if sections:
                sections[-1]["body"] = "\n".join(body)
            sections.append({"level": len(heading.group(1)), "heading": heading.group(2)})
            body = []
        else:
            body.append(line)
    sections.pop()  # the end marker
    for s in sections:
        blocks = re.findall(r"^```(\w*)\n(.*?)^```", s["body"], re.M | re.S)
        s["python"] = [b for kind, b in blocks if kind == "python"]
        s["text"] = [b for kind, b in blocks if kind == "text"]
        s["py"] = [re.sub(r" *#.*", "", b) for kind, b in blocks if kind == "py"]  # comments may be translated
        s["inline"] = INLINE.findall(s["body"])
        s["formulas"] = s["body"].count("$$") // 2
        s["optional"] = s["body"].lstrip().startswith("*Optional.*") or "选读" in s["heading"]
    return sections


def check_twins() -> list[str]:
    en, zh = ((ROOT / g).read_text() for g in GUIDES)
    ours, theirs = _sections(en), _sections(zh)
    problems = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a["level"] != b["level"]:
            problems.append(f"{GUIDES[1]}: section {i + 1} {b['heading']!r} is level {b['level']}, its twin "
                            f"{a['heading']!r} level {a['level']} (the guides must have the same sections in order)")
            break
        for key in ("python", "text", "py", "inline", "formulas", "optional"):
            if a[key] != b[key]:
                problems.append(f"{GUIDES[1]}: section {b['heading']!r} differs from its twin {a['heading']!r} "
                                f"in {key}: {b[key]!r} / {a[key]!r}")
    if len(ours) != len(theirs) and not problems:
        extra = (ours if len(ours) > len(theirs) else theirs)[min(len(ours), len(theirs)):]
        problems.append(f"{GUIDES[1]} has {len(theirs)} sections, {GUIDES[0]} {len(ours)}; unpaired: "
                        f"{[s['heading'] for s in extra]}")
    return problems


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    heads = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def check_links() -> list[str]:
    problems = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                problems.append(f"{doc.relative_to(ROOT)}: link to a missing file: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{doc.relative_to(ROOT)}: link to a missing heading: {target}")
    return problems


def check_readme() -> list[str]:
    text = (ROOT / "README.md").read_text()
    problems = []
    if text.count("```bash") != 2:
        problems.append(f"README.md: {text.count('```bash')} ```bash blocks; the two set-up commands only")
    for doc in ("README.md", "docs/benchmarks.md"):
        body = (ROOT / doc).read_text()
        opened = re.findall(r"^<!-- bench:([\w-]+) -->$", body, re.M)
        closed = re.findall(r"^<!-- /bench:([\w-]+) -->$", body, re.M)
        if sorted(opened) != sorted(closed) or len(set(opened)) != len(opened):
            problems.append(f"{doc}: bench markers do not pair once each: {opened} / {closed}")
    return problems


if __name__ == "__main__":
    found = check_quotes() + check_twins() + check_links() + check_readme()
    print("\n".join(found) or "docs: quotes, twin guides, links and markers OK")
    sys.exit(1 if found else 0)
