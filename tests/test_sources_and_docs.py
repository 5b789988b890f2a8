"""The API of the sources this library grew from, as they write it (the CMU 11-711 minllama
assignment's optimizer.py, the Intro2LLM lesson L07), the README's example, the demo command, and
the docs: quotes, links, and the measured tables generated from their JSON."""

from __future__ import annotations

import math
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_minllama_adamw_signature_and_llama_loop():
    """The minllama assignment's optimizer.py: AdamW(params, lr, betas, eps, weight_decay, correct_bias), a
    CosineAnnealingLR stepped once per epoch."""
    from optimizer.adamw import AdamW

    model = torch.nn.Linear(4, 2)
    lr, epochs = 1e-3, 5
    optimizer = AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=lr * 1e-3)
    for _ in range(epochs):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
        scheduler.step()
    assert abs(optimizer.param_groups[0]["lr"] - lr * 1e-3) < 1e-12
    state = optimizer.state[model.weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and int(state["step"]) == 15


def test_intro2llm_l07_layout_and_signatures():
    from optimizer.adamw import AdamW
    from optimizer.lion import Lion
    from optimizer.scheduler import WarmupCosineScheduler

    params = [torch.nn.Parameter(torch.randn(3))]
    opt = AdamW(params, 1e-3, (0.9, 0.999), 1e-8, 0.01)  # positional, as L07 writes it
    Lion([torch.nn.Parameter(torch.randn(3))], 1e-4, (0.9, 0.99), 0.0)
    sched = WarmupCosineScheduler(opt, 100, 1000, 0.1)
    for step in range(1000):
        sched.step(step)  # L07's call: "update the learning rate for this step"
    floor, peak = 0.1 * 1e-3, 1e-3  # step 999 of warmup 100, total 1000
    expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 899 / 900))
    assert abs(opt.param_groups[0]["lr"] - expected) < 1e-15


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Example\s+```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].item() < 0.1  # sin(x0) has variance 0.43: it learned


def test_example_config_is_valid():
    """examples/demo.yaml, shown in the README, passes the demo's own checks."""
    import argparse

    from optimizer import cli

    cfg = cli._demo_settings(argparse.Namespace(config=str(ROOT / "examples" / "demo.yaml")))
    assert cfg["optimizer_args"]["adamw"]["betas"] == (0.9, 0.95)


def test_docs_quote_the_code_as_it_is():
    """docs/check_docs.py: the guides' quoted code lines exist verbatim, links resolve, the README
    keeps its two set-up commands and paired bench markers."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "docs" / "check_docs.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_measured_tables_are_their_json():
    """Every table between <!-- bench:NAME --> markers in README.md and docs/*.md is what
    tools/bench_tables.py writes from docs/bench/NAME.json (the README's headline from several):
    generated, not edited by hand."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_demo_table_is_its_json(tmp_path):
    """The README's demo table is what tools/demo_table.py writes from docs/bench/demo/runs.json (the
    summaries of demo runs at several seeds), and a table edited by hand fails --check."""
    import shutil
    import subprocess
    import sys

    tool = [sys.executable, str(ROOT / "tools" / "demo_table.py")]
    done = subprocess.run([*tool, "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (ROOT / "docs" / "bench" / "demo" / "runs.json").exists()
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "docs" / "bench" / "demo", tmp_path / "docs" / "bench" / "demo")
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- demo:table -->")
    edited = text[:start] + text[start:].replace("| adamw |", "| adamw (edited) |", 1)
    (tmp_path / "README.md").write_text(edited)
    stale = subprocess.run([*tool, "--check", "--root", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert stale.returncode == 1 and "differs" in stale.stderr
    assert subprocess.run([*tool, "--root", str(tmp_path)], capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / "README.md").read_text() == text
