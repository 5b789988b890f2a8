"""The seed documents' API as they write it, the README's example, and the demo command."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_first_seed_adamw_signature_and_llama_loop():
    """optimizer.py of the course: AdamW(params, lr, betas, eps, weight_decay, correct_bias), a
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


def test_second_seed_layout_and_signatures():
    from optimizer.adamw import AdamW
    from optimizer.lion import Lion
    from optimizer.scheduler import WarmupCosineScheduler

    params = [torch.nn.Parameter(torch.randn(3))]
    opt = AdamW(params, 1e-3, (0.9, 0.999), 1e-8, 0.01)  # positional, as the lesson writes it
    Lion([torch.nn.Parameter(torch.randn(3))], 1e-4, (0.9, 0.99), 0.0)
    sched = WarmupCosineScheduler(opt, 100, 1000, 0.1)
    for step in range(1000):
        sched.step(step)  # the lesson's call: "update the learning rate for this step"
    assert abs(opt.param_groups[0]["lr"] - (1e-4 + 0.9e-3 * 0.5 * (1 + __import__("math").cos(3.14159265358979 * 899 / 900)))) < 1e-12


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Example\s+```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].item() < 0.1  # sin(x0) has variance 0.43: it learned


def test_demo_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "optimizer", "demo", "--steps", "40", "--warmup-steps", "4"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["AdamW"], ["Lion"])}
    for name in ("AdamW", "Lion"):
        first, last = float(rows[name][1]), float(rows[name][2])
        assert last < first, out


def test_unknown_command_fails_with_usage():
    done = subprocess.run([sys.executable, "-m", "optimizer", "nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stdout
