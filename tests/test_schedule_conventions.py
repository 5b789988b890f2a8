"""get_scheduler called as transformers' or with timm's keywords gives their curves, to 1e-12
of the peak at every step, past the end included: checked against the values transformers
and timm themselves gave (tests/data/schedule_tables.json, written by
tests/data/make_schedule_tables.py), so that CI needs neither library."""

from __future__ import annotations

import copy
import io
import json
import math
import os

import pytest
import torch

from optimizer import AdamW
from optimizer.scheduler import HFScheduleLR, ScheduleLR, TimmScheduleLR, get_scheduler

with open(os.path.join(os.path.dirname(__file__), "data", "schedule_tables.json")) as f:
    TABLES = json.load(f)
GROUP_LRS = TABLES["group_lrs"]
HF = [c for c in TABLES["cases"] if c["library"] == "transformers" and "metrics" not in c]
METRIC = [c for c in TABLES["cases"] if "metrics" in c]
TIMM = [c for c in TABLES["cases"] if c["library"] == "timm"]
TOL = 1e-12 * max(GROUP_LRS)


def optimizer(lr_scale=None):
    """The optimizer the tables were made with: two groups, the first at the default lr."""
    second = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": GROUP_LRS[1]}
    if lr_scale is not None:
        second["lr_scale"] = lr_scale
    return AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}, second], lr=GROUP_LRS[0])


def lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def assert_curve(got, expected, case):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (case["name"], case.get("kwargs"), step, a, b)


def case_id(c):
    return f"{c['name']}-{c.get('num_warmup_steps')}-{c.get('num_training_steps')}-{c['kwargs']}"


@pytest.mark.parametrize("case", HF, ids=[case_id(c) for c in HF])
def test_hugging_face_calls_give_hugging_faces_curve(case):
    opt = optimizer()
    sched = get_scheduler(case["name"], opt, num_warmup_steps=case["num_warmup_steps"],
                          num_training_steps=case["num_training_steps"], scheduler_specific_kwargs=dict(case["kwargs"]))
    assert isinstance(sched, HFScheduleLR)
    got = [lrs(opt)]
    for _ in range(len(case["lrs"]) - 1):
        sched.step()
        got.append(lrs(opt))
    assert_curve(got, case["lrs"], case)


@pytest.mark.parametrize("case", METRIC, ids=[f"{c['name']}-{c['kwargs']}" for c in METRIC])
def test_hugging_face_metric_schedules_follow_the_metric_as_theirs(case):
    opt = optimizer()
    sched = get_scheduler(case["name"], opt, scheduler_specific_kwargs=dict(case["kwargs"]))
    got = [lrs(opt)]
    for m in case["metrics"]:
        sched.step(m)
        got.append(lrs(opt))
    assert len({tuple(v) for v in case["lrs"]}) > 1  # the case does move the rate
    assert_curve(got, case["lrs"], case)


def test_greedy_resumes_from_its_state_dict():
    case = next(c for c in METRIC if c["name"] == "greedy" and c["kwargs"].get("smooth"))
    opt = optimizer()
    sched = get_scheduler("greedy", opt, scheduler_specific_kwargs=dict(case["kwargs"]))
    half = len(case["metrics"]) // 2
    for m in case["metrics"][:half]:
        sched.step(m)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = optimizer()
    resumed = get_scheduler("greedy", opt2, scheduler_specific_kwargs=dict(case["kwargs"]))
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert lrs(opt2) == lrs(opt)
    got = []
    for m in case["metrics"][half:]:
        resumed.step(m)
        got.append(lrs(opt2))
    assert_curve(got, case["lrs"][half + 1:], case)


@pytest.mark.parametrize("change, message", [
    (dict(factor=1.5), "'factor' is 1.5 (must be a number in (0, 1))"),
    (dict(_last_lr=[0.1]), "'_last_lr' is [0.1] (must be a list of 2 finite numbers"),
    (dict(best=float("nan")), "'best' is nan"),
    (dict(mode="up"), "'mode' is 'up'"),
    (dict(num_bad_epochs=-1), "'num_bad_epochs' is -1 (must be an integer >= 0)"),
    (dict(_window=[1.0] * 6), "'_window' holds 6 values, more than its window_size 5"),
    (dict(patiance=3), "unknown keys ['patiance']"),
    ("drop best", "missing ['best']"),
])
def test_greedy_refuses_a_bad_state_dict_and_changes_nothing(change, message):
    case = next(c for c in METRIC if c["name"] == "greedy" and c["kwargs"].get("smooth"))
    opt = optimizer()
    sched = get_scheduler("greedy", opt, scheduler_specific_kwargs=dict(case["kwargs"]))
    for m in case["metrics"][:30]:
        sched.step(m)
    saved = sched.state_dict()
    bad = {k: v for k, v in saved.items() if k != "best"} if change == "drop best" else {**saved, **change}
    fresh_opt = optimizer()
    fresh = get_scheduler("greedy", fresh_opt, scheduler_specific_kwargs=dict(case["kwargs"]))
    before, lrs_before = copy.deepcopy(fresh.state_dict()), lrs(fresh_opt)
    with pytest.raises(ValueError, match="Invalid state_dict for GreedyLR") as err:
        fresh.load_state_dict(bad)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert fresh.state_dict() == before and lrs(fresh_opt) == lrs_before
    fresh.load_state_dict(saved)  # and the good one still loads
    assert fresh.state_dict() == saved and lrs(fresh_opt) == lrs(opt)


@pytest.mark.parametrize("case", TIMM, ids=[f"{c['class']}-{c['kwargs']}-{c['lr_scale']}" for c in TIMM])
def test_timm_keywords_give_timms_curve(case):
    opt = optimizer(case["lr_scale"])
    sched = get_scheduler(case["name"], opt, **copy.deepcopy(case["kwargs"]))
    assert isinstance(sched, TimmScheduleLR)
    got = [lrs(opt)]  # as built
    for t in range(len(case["lrs"]) - 1):
        sched.step(t)
        if case["per_update"]:
            sched.step_update(t)
        got.append(lrs(opt))
    assert_curve(got, case["lrs"], case)


# --- which entry follows whose conventions -----------------------------------

def test_the_keywords_choose_the_convention():
    hf = get_scheduler("cosine", optimizer(), num_warmup_steps=10, num_training_steps=100)
    timm = get_scheduler("cosine", optimizer(), t_initial=100, warmup_t=10)
    ours = get_scheduler("cosine", optimizer(), warmup_steps=10, total_steps=100)
    assert (type(hf), type(timm), type(ours)) == (HFScheduleLR, TimmScheduleLR, ScheduleLR)
    assert hf.get_lr(0, 0) == 0.0  # Hugging Face: s / W
    assert timm.get_lr(0, 0) == 0.0  # timm: from warmup_lr_init
    assert ours.get_lr(0, 0) == pytest.approx(GROUP_LRS[0] / 11)  # ours: (s + 1) / (W + 1)
    assert hf.get_lr(10, 0) == ours.get_lr(10, 0) == GROUP_LRS[0]  # the peak at the end of warmup
    assert timm.get_lr(10, 0) < GROUP_LRS[0]  # timm lays its warmup over the start of the cosine
    assert get_scheduler("exponential", optimizer(), gamma=0.9).like == "ours"


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(num_warmup_steps=5, t_initial=10), "mix the step counts"),
    (dict(num_training_steps=5, warmup_steps=1), "mix the step counts"),
    (dict(t_initial=10, total_steps=20), "mix the step counts"),
    (dict(T_max=10), "torch.optim.lr_scheduler keyword"),
    (dict(num_warmup_steps=5, num_training_steps=10, lr_min=0.1), "Invalid argument 'lr_min'"),
    (dict(t_initial=10, num_cycles=2), "Invalid argument 'num_cycles' for timm's 'cosine'"),
])
def test_mixed_or_foreign_keywords_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        get_scheduler("cosine", optimizer(), **kwargs)


def test_hugging_face_requirements_are_theirs():
    with pytest.raises(ValueError, match="requires num_warmup_steps"):
        get_scheduler("linear", optimizer(), num_training_steps=10)
    with pytest.raises(ValueError, match="requires num_training_steps"):
        get_scheduler("cosine", optimizer(), num_warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr or min_lr_rate"):
        get_scheduler("cosine_with_min_lr", optimizer(), 10, 100)
    with pytest.raises(ValueError, match="lr_end"):
        get_scheduler("polynomial", optimizer(), 10, 100, lr_end=5.0)
    with pytest.raises(ValueError, match="warmup_type"):
        get_scheduler("warmup_stable_decay", optimizer(), 10, 100, num_decay_steps=5, warmup_type="exp")
    assert isinstance(get_scheduler("reduce_lr_on_plateau", optimizer(), patience=3),
                      torch.optim.lr_scheduler.ReduceLROnPlateau)


@pytest.mark.parametrize("make", [
    lambda opt: get_scheduler("cosine_with_min_lr", opt, 10, 100, min_lr_rate=0.1),
    lambda opt: get_scheduler("polynomial", opt, 10, 100, power=2.0),
    lambda opt: get_scheduler("cosine", opt, t_initial=30, warmup_t=5, cycle_limit=2, noise_range_t=10),
], ids=["transformers", "transformers-polynomial", "timm"])
def test_state_dicts_are_plain_and_resume(make):
    opt = optimizer()
    sched = make(opt)
    for _ in range(12):
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = optimizer()
    twin = make(opt2)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(30):
        sched.step()
        twin.step()
        assert lrs(opt) == lrs(opt2)


def test_transformers_own_schedule_values():
    """The expectations of transformers' own scheduler test (ScheduleInitTest, lr 10, 10
    steps), through our get_scheduler, with a save and reload halfway."""
    cases = {
        ("constant", None, None): ({}, [10.0] * 10),
        ("constant_with_warmup", 4, None): ({}, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
        ("linear", 2, 10): ({}, [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25]),
        ("cosine", 2, 10): ({}, [0.0, 5.0, 10.0, 9.61, 8.53, 6.91, 5.0, 3.08, 1.46, 0.38]),
        ("cosine_with_restarts", 2, 10): ({"num_cycles": 2}, [0.0, 5.0, 10.0, 8.53, 5.0, 1.46, 10.0, 8.53, 5.0,
                                                              1.46]),
        ("polynomial", 2, 10): ({"power": 2.0, "lr_end": 1e-7}, [0.0, 5.0, 10.0, 7.656, 5.625, 3.906, 2.5, 1.406,
                                                                 0.625, 0.156]),
        ("inverse_sqrt", 2, None): ({}, [0.0, 5.0, 10.0, 8.165, 7.071, 6.325, 5.774, 5.345, 5.0, 4.714]),
    }
    for (name, warmup, total), (kwargs, expected) in cases.items():
        def run(reload):
            opt = AdamW(torch.nn.Linear(50, 50).parameters(), lr=10.0)
            sched = get_scheduler(name, opt, warmup, total, scheduler_specific_kwargs=kwargs)
            out = []
            for step in range(10):
                out.append(sched.get_lr()[0])
                sched.step()
                if reload and step == 5:
                    buf = io.BytesIO()
                    torch.save(sched.state_dict(), buf)
                    buf.seek(0)
                    sched.load_state_dict(torch.load(buf))
            return out

        got = run(False)
        assert got == pytest.approx(expected, abs=1e-2), name
        assert run(True) == got, name


def test_timm_steps_per_update_and_lr_scale():
    opt = optimizer(lr_scale=0.5)
    sched = get_scheduler("cosine", opt, t_initial=10, t_in_epochs=False)
    sched.step(5)  # per update: an epoch step changes nothing
    assert lrs(opt) == [GROUP_LRS[0], GROUP_LRS[1] * 0.5]
    sched.step_update(5)
    expected = [lr * 0.5 * (1 + math.cos(math.pi * 0.5)) for lr in GROUP_LRS]
    assert lrs(opt) == pytest.approx([expected[0], expected[1] * 0.5], rel=1e-12)
