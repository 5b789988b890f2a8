"""The algorithms guides (docs/algorithms.md and its Chinese twin docs/zh/algorithms.md): their
examples run and print what they say, and what they say about torch's CosineAnnealingLR, Hugging
Face's schedules and the Intro2LLM lesson L07 is what those do. docs/check_docs.py checks the
guides' quotes and that the two have the same sections; the last test checks that check."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import pathlib
import re
import shutil

import pytest
import torch

from optimizer import AdamW, get_scheduler
from optimizer.scheduler import WarmupCosineScheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = ["docs/algorithms.md", "docs/zh/algorithms.md"]


def l07_lr(t: int, eta_max: float, warmup_steps: int, total: int, eta_min: float) -> float:
    """The lesson L07's schedule, as it writes it: eta_max t / warmup_steps, then
    eta_min + (eta_max - eta_min) (1 + cos(pi (t - warmup_steps) / (T - warmup_steps))) / 2."""
    if t < warmup_steps:
        return eta_max * t / warmup_steps
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos((t - warmup_steps) / (total - warmup_steps) * math.pi))


def _printed_as_said(code: str, printed: str) -> None:
    """Each ``print(...)  # VALUES...`` of an example printed VALUES (a token ending in ``...``
    is a prefix); the comment's values end at ':', '：' or ' = '."""
    said = [re.split(r":|：| = ", line.split("#", 1)[1])[0].split() for line in code.splitlines()
            if line.startswith("print(") and "#" in line]
    outputs = [line.split() for line in printed.splitlines()]
    assert len(said) == len(outputs), (said, outputs)
    for want, got in zip(said, outputs):
        assert len(want) == len(got), (want, got)
        for w, g in zip(want, got):
            assert g.startswith(w[:-3]) if w.endswith("...") else g == w, (want, got)


@pytest.mark.parametrize("guide", GUIDES)
def test_the_guides_examples_run_and_print_what_they_say(guide):
    examples = re.findall(r"^```py\n(.*?)^```", (ROOT / guide).read_text(), re.M | re.S)
    assert len(examples) == 3  # SparseAdamW's use, the three conventions, L07's curve
    for code in examples:
        torch.manual_seed(0)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, guide, "exec"), {})
        _printed_as_said(code, out.getvalue())


def test_l07s_curve_is_hugging_faces_cosine_with_min_lr():
    """The guide's call gives L07's formula at every step of [0, T] (L07's call, step(t))."""
    opt = AdamW(torch.nn.Linear(4, 4).parameters(), lr=1e-3)
    sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=100, num_training_steps=1000,
                          min_lr_rate=0.1)
    for t in range(1001):
        sched.step(t)
        assert abs(opt.param_groups[0]["lr"] - l07_lr(t, 1e-3, 100, 1000, 1e-4)) < 1e-15, t


def test_transformers_cosine_with_min_lr_is_l07s_formula_and_rises_after_T():
    """transformers 5.23's own values (tests/data/schedule_tables.json) are L07's formula at every
    recorded step, past T too, where both climb back: 0.2 at T = 100, 0.41 at step 120 (P = 2).
    Its plain ``cosine`` climbs back after T as well (Note [end of the schedule])."""
    tables = json.loads((ROOT / "tests" / "data" / "schedule_tables.json").read_text())
    case = next(c for c in tables["cases"] if c["library"] == "transformers" and c["name"] == "cosine_with_min_lr"
                and c["kwargs"] == {"min_lr_rate": 0.1})
    warmup, total = case["num_warmup_steps"], case["num_training_steps"]
    assert (warmup, total) == (10, 100) and len(case["lrs"]) == 121
    for group, peak in enumerate(tables["group_lrs"]):
        for t, lrs in enumerate(case["lrs"]):
            assert abs(lrs[group] - l07_lr(t, peak, warmup, total, 0.1 * peak)) < 1e-12 * peak, (group, t)
    first = [lrs[0] for lrs in case["lrs"]]
    assert tables["group_lrs"][0] == 2.0 and round(first[100], 4) == 0.2 and round(first[120], 2) == 0.41
    assert all(b > a for a, b in zip(first[100:], first[101:]))
    cosine = next(c for c in tables["cases"] if c["library"] == "transformers" and c["name"] == "cosine"
                  and c["kwargs"] == {} and c["num_training_steps"] == 100)  # its plain cosine climbs too
    assert all(b[0] > a[0] for a, b in zip(cosine["lrs"][100:], cosine["lrs"][101:]))


def test_l07s_own_scheduler_tests_pass_with_ours_and_reject_its_formula():
    """L07's testcases build WarmupCosineScheduler(optimizer=None, 100, 1000, min_lr=1e-6) and
    assert get_lr(0) > 0 (basic_test.py) and get_lr(50) > get_lr(0) (advanced_test.py). L07's
    formula gives exactly 0 at step 0; ours is the same line one step ahead, at most P / (W + 1)
    higher."""
    sched = WarmupCosineScheduler(optimizer=None, warmup_steps=100, total_steps=1000, min_lr=1e-6)
    assert sched.get_lr(0) > 0
    assert sched.get_lr(50) > sched.get_lr(0)
    assert l07_lr(0, 1.0, 100, 1000, 1e-6) == 0.0
    for s in range(101):
        assert 0 <= sched.get_lr(s) - l07_lr(s, 1.0, 100, 1000, 1e-6) <= 1 / 101 + 1e-15, s
    assert sched.get_lr(0) == 1 / 101 and sched.get_lr(100) == 1.0


def test_cosine_annealing_lr_climbs_back_after_T_where_ours_holds_the_floor():
    """torch's CosineAnnealingLR(T_max=10, eta_min=0.1) from lr 1.0: 0.1 at step 10, then 0.122,
    0.186, 0.285, 0.411, 0.55 at steps 11-15 and 1.0 at step 20 (a cosine of period 2 T_max).
    Ours with the same T, floor and no warmup: the same values on [0, T], the floor after."""
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=10, eta_min=0.1)
    our_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = WarmupCosineScheduler(our_opt, warmup_steps=0, total_steps=10, min_lr=0.1)
    torch_lrs, our_lrs = [], []
    for _ in range(21):
        torch_lrs.append(torch_opt.param_groups[0]["lr"])
        our_lrs.append(our_opt.param_groups[0]["lr"])
        torch_opt.step()
        our_opt.step()
        theirs.step()
        ours.step()
    assert our_lrs[:11] == pytest.approx(torch_lrs[:11], abs=1e-12)
    assert [round(lr, 3) for lr in torch_lrs[10:16]] == [0.1, 0.122, 0.186, 0.285, 0.411, 0.55]
    assert torch_lrs[20] == pytest.approx(1.0, abs=1e-12)
    assert our_lrs[10:] == [0.1] * 11


def test_round_to_nearest_drops_small_steps_of_a_bf16_weight_at_one():
    """The guides: a bf16 weight at 1.0 ignores steps below 2^-9 (about 0.002) downwards and
    2^-8 (about 0.004) upwards when rounded to nearest."""
    def rounded(step: float) -> float:
        return (torch.tensor(1.0) + step).to(torch.bfloat16).item()

    assert rounded(0.0039) == 1.0 and rounded(0.0040) == 1 + 2**-7
    assert rounded(-0.0019) == 1.0 and rounded(-0.0020) == 1 - 2**-8


def test_without_bias_correction_the_first_step_is_3_16_learning_rates():
    """The guides: with correct_bias=False, m / sqrt(v) at t = 1 is (1 - b1) / sqrt(1 - b2), 3.16."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamW([p], lr=1e-3, weight_decay=0.0, correct_bias=False)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    ratio = 0.1 / math.sqrt(0.001)
    assert round(ratio, 2) == 3.16
    torch.testing.assert_close(p.detach(), -1e-3 * ratio * p.grad.sign(), rtol=1e-5, atol=0)


def _check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "docs" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_docs_finds_what_the_chinese_guide_lacks(tmp_path, monkeypatch):
    """check_docs.check_twins: a section, a quoted line or an optional mark missing from the
    Chinese guide is reported; the guides as they are pass."""
    check_docs = _check_docs()
    (tmp_path / "docs" / "zh").mkdir(parents=True)
    shutil.copy(ROOT / GUIDES[0], tmp_path / GUIDES[0])
    zh = (ROOT / GUIDES[1]).read_text()
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)

    def problems(text: str) -> list[str]:
        (tmp_path / GUIDES[1]).write_text(text)
        return check_docs.check_twins()

    assert problems(zh) == []
    without_section = re.sub(r"^### 二阶矩不是方差\n.*?(?=^### )", "", zh, count=1, flags=re.M | re.S)
    assert without_section != zh and problems(without_section)
    quote = "    return peak_lr * (step + 1) / (warmup_steps + 1)\n"
    assert quote in zh and problems(zh.replace(quote, "", 1))
    assert problems(zh.replace("## SparseAdamW（选读）", "## SparseAdamW", 1))
    assert problems(zh.replace("\n## 学习率调度\n", "\n### 学习率调度\n", 1))
