"""Write schedule_tables.json: the learning rates Hugging Face's and timm's own schedulers
give, step by step, for the cases below. tests/test_schedule_conventions.py checks
`optimizer.get_scheduler` against them, so CI needs neither library.

Run it where transformers and timm are installed (any recent torch):

    python -m venv /tmp/ref && . /tmp/ref/bin/activate
    pip install torch transformers timm
    python tests/data/make_schedule_tables.py        # rewrites tests/data/schedule_tables.json

Each case is an optimizer with two parameter groups (lr 2.0, the optimizer's default, and
0.5), the scheduler built by the library from the case's keywords, and the learning rate of
both groups at every step from construction to well past the end of the schedule.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import timm
import timm.scheduler as ts
import torch
import transformers
from transformers import get_scheduler

GROUP_LRS = (2.0, 0.5)  # the first is the optimizer's default lr (Hugging Face's polynomial reads it)


def optimizer(lr_scale: float | None = None) -> torch.optim.Optimizer:
    second = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": GROUP_LRS[1]}
    if lr_scale is not None:
        second["lr_scale"] = lr_scale
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}, second], lr=GROUP_LRS[0])


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


# (name, num_warmup_steps, num_training_steps, scheduler_specific_kwargs, steps to record)
HF_CASES = [
    ("constant", None, None, {}, 20),
    ("constant", 10, 100, {}, 20),  # Hugging Face ignores the warmup of "constant"
    ("constant_with_warmup", 10, None, {}, 30),
    ("constant_with_warmup", 0, None, {}, 10),
    ("constant_with_warmup", 1, None, {}, 10),
    ("linear", 10, 100, {}, 120),
    ("linear", 0, 50, {}, 60),
    ("linear", 5, 5, {}, 15),
    ("linear", 2, 10, {}, 10),  # transformers' own test case
    ("cosine", 10, 100, {}, 120),
    ("cosine", 0, 50, {}, 60),
    ("cosine", 10, 100, {"num_cycles": 1.5}, 120),
    ("cosine", 4, 4, {}, 12),
    ("cosine_with_restarts", 10, 100, {}, 120),
    ("cosine_with_restarts", 10, 100, {"num_cycles": 3}, 120),
    ("cosine_with_restarts", 2, 10, {"num_cycles": 2}, 10),  # transformers' own test case
    ("polynomial", 10, 100, {}, 120),
    ("polynomial", 10, 100, {"lr_end": 0.01, "power": 2.0}, 120),
    ("polynomial", 0, 60, {"lr_end": 0.1, "power": 0.5}, 80),
    ("inverse_sqrt", 10, None, {}, 200),
    ("inverse_sqrt", 0, None, {}, 50),
    ("inverse_sqrt", 10, None, {"timescale": 25}, 100),
    ("cosine_with_min_lr", 10, 100, {"min_lr_rate": 0.1}, 120),
    ("cosine_with_min_lr", 10, 100, {"min_lr": 0.05}, 120),
    ("cosine_with_min_lr", 0, 40, {"min_lr_rate": 0.2, "num_cycles": 1.0}, 60),
    ("cosine_warmup_with_min_lr", 10, 100, {"min_lr_rate": 0.1}, 120),
    ("cosine_warmup_with_min_lr", 10, 100, {"min_lr": 0.05, "warmup_lr_rate": 0.2}, 120),
    ("cosine_warmup_with_min_lr", 1, 30, {"min_lr_rate": 0.0, "warmup_lr_rate": 0.5}, 40),
    ("cosine_warmup_with_min_lr", 0, 30, {"min_lr_rate": 0.1}, 40),
    ("warmup_stable_decay", 10, 100, {"num_decay_steps": 20}, 120),
    ("warmup_stable_decay", 10, None, {"num_stable_steps": 50, "num_decay_steps": 20}, 100),
    ("warmup_stable_decay", 10, 100, {"num_decay_steps": 30, "warmup_type": "cosine", "decay_type": "linear",
                                      "min_lr_ratio": 0.1}, 120),
    ("warmup_stable_decay", 10, 100, {"num_decay_steps": 30, "warmup_type": "1-sqrt", "decay_type": "1-sqrt",
                                      "min_lr_ratio": 0.05}, 120),
    ("warmup_stable_decay", 5, 60, {"num_decay_steps": 20, "num_cycles": 1.0}, 70),
    ("warmup_stable_decay", 0, None, {"num_stable_steps": 10, "num_decay_steps": 10}, 30),
]


def hf_cases() -> list[dict]:
    out = []
    for name, warmup, total, kwargs, steps in HF_CASES:
        opt = optimizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                                  scheduler_specific_kwargs=dict(kwargs))
            values = [lrs(opt)]
            for _ in range(steps):
                opt.step()
                sched.step()
                values.append(lrs(opt))
        out.append({"library": "transformers", "name": name, "num_warmup_steps": warmup,
                    "num_training_steps": total, "kwargs": kwargs, "lrs": values})
    return out


# the metric the metric-driven schedules follow: falls, wobbles on a plateau, rises, falls again
METRICS = [round(2.0 / (1.0 + 0.2 * t) + 0.05 * math.sin(1.7 * t) + (0.01 * (t - 60) if 60 <= t < 90 else 0.0), 12)
           for t in range(150)]
METRIC_CASES = [
    ("reduce_lr_on_plateau", {}),
    ("reduce_lr_on_plateau", {"patience": 2, "factor": 0.5, "cooldown": 1, "min_lr": 0.01}),
    ("greedy", {}),
    ("greedy", {"patience": 2, "factor": 0.8, "min_lr": 0.05, "max_lr": 3.0}),
    ("greedy", {"patience": 1, "factor": 0.5, "cooldown": 2, "warmup": 1, "threshold": 1e-3,
                "threshold_mode": "rel", "min_lr": [0.1, 0.01], "max_lr": [4.0, 1.0]}),
    ("greedy", {"patience": 2, "factor": 0.7, "smooth": True, "window_size": 5, "min_lr": 0.2, "reset_start": 3}),
    ("greedy", {"mode": "max", "patience": 3, "factor": 0.9, "eps": 1e-2}),
]


def metric_cases() -> list[dict]:
    out = []
    for name, kwargs in METRIC_CASES:
        opt = optimizer()
        sched = get_scheduler(name, opt, scheduler_specific_kwargs=dict(kwargs))
        values = [lrs(opt)]
        for m in METRICS:
            opt.step()
            sched.step(m)
            values.append(lrs(opt))
        out.append({"library": "transformers", "name": name, "kwargs": kwargs, "metrics": METRICS, "lrs": values})
    return out


# (timm class, our name, keywords, steps to record, lr_scale of the second group, stepped per update)
TIMM_CASES = [
    (ts.CosineLRScheduler, "cosine", {"t_initial": 100}, 120, None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 100, "warmup_t": 10}, 120, None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 100, "warmup_t": 10, "warmup_prefix": True,
                                      "warmup_lr_init": 1e-4, "lr_min": 1e-3}, 130, None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 30, "cycle_limit": 3, "cycle_decay": 0.5, "lr_min": 0.01}, 110,
     None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 10, "cycle_mul": 2.0, "cycle_limit": 3, "warmup_t": 5}, 90, None,
     False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 50, "k_decay": 2.0}, 60, None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 50, "noise_range_t": 20, "noise_pct": 0.3, "noise_std": 0.5}, 60,
     None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 50, "noise_range_t": [10, 30], "noise_seed": 7}, 60, None, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 40, "warmup_t": 4}, 50, 0.1, False),
    (ts.CosineLRScheduler, "cosine", {"t_initial": 40, "warmup_t": 4, "t_in_epochs": False}, 50, None, True),
    (ts.TanhLRScheduler, "tanh", {"t_initial": 100}, 120, None, False),
    (ts.TanhLRScheduler, "tanh", {"t_initial": 100, "warmup_t": 10, "lr_min": 0.01}, 120, None, False),
    (ts.TanhLRScheduler, "tanh", {"t_initial": 100, "warmup_t": 10, "warmup_prefix": True, "lb": -5.0, "ub": 2.0},
     120, None, False),
    (ts.TanhLRScheduler, "tanh", {"t_initial": 20, "cycle_limit": 3, "cycle_mul": 1.5, "cycle_decay": 0.7}, 90,
     None, False),
    (ts.PolyLRScheduler, "poly", {"t_initial": 100}, 120, None, False),
    (ts.PolyLRScheduler, "poly", {"t_initial": 100, "power": 2.0, "warmup_t": 10, "lr_min": 0.01}, 120, None,
     False),
    (ts.PolyLRScheduler, "poly", {"t_initial": 30, "cycle_limit": 2, "cycle_decay": 0.5, "k_decay": 1.5,
                                  "warmup_t": 5, "warmup_prefix": True}, 80, None, False),
    (ts.StepLRScheduler, "step", {"decay_t": 30, "decay_rate": 0.5}, 100, None, False),
    (ts.StepLRScheduler, "step", {"decay_t": 7.5, "decay_rate": 0.8, "warmup_t": 5, "warmup_lr_init": 0.01}, 60,
     None, False),
    (ts.StepLRScheduler, "step", {"decay_t": 10, "decay_rate": 0.5, "warmup_t": 5, "warmup_prefix": False}, 40,
     None, False),
    (ts.MultiStepLRScheduler, "multistep", {"decay_t": [30, 60, 80], "decay_rate": 0.1}, 100, None, False),
    (ts.MultiStepLRScheduler, "multistep", {"decay_t": [10, 20], "decay_rate": 0.5, "warmup_t": 5,
                                            "warmup_lr_init": 0.1}, 40, None, False),
    (ts.MultiStepLRScheduler, "multistep", {"decay_t": [10, 20], "decay_rate": 0.5, "warmup_t": 5,
                                            "warmup_prefix": False}, 40, None, False),
    (ts.WSDLRScheduler, "wsd", {"t_initial": 100, "decay_t": 20}, 120, None, False),
    (ts.WSDLRScheduler, "wsd", {"t_initial": 100, "decay_t": 30, "warmup_t": 10, "lr_min": 0.01,
                                "decay_fn": "cosine"}, 130, None, False),
    (ts.WSDLRScheduler, "wsd", {"t_initial": 100, "decay_t": 30, "warmup_t": 10, "stable_fn": "rsqrt",
                                "decay_fn": "linear"}, 130, None, False),
    (ts.WSDLRScheduler, "wsd", {"t_initial": 80, "decay_t": 40, "warmup_t": 5, "stable_fn": "power",
                                "stable_power": 0.3, "stable_timescale": 20.0, "decay_fn": "power",
                                "decay_power": 2.0, "lr_min": 0.05}, 100, None, False),
    (ts.WSDLRScheduler, "wsd", {"t_initial": 60, "decay_t": 30, "decay_fn": "exp", "decay_ratio": 0.05}, 70, None,
     False),
]


def timm_cases() -> list[dict]:
    out = []
    for cls, name, kwargs, steps, lr_scale, per_update in TIMM_CASES:
        opt = optimizer(lr_scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = cls(opt, **kwargs)
        values = [lrs(opt)]  # as built
        for t in range(steps + 1):
            if per_update:
                sched.step(t)  # a no-op when t_in_epochs=False
                sched.step_update(t)
            else:
                sched.step(t)
            values.append(lrs(opt))
        out.append({"library": "timm", "name": name, "class": cls.__name__, "kwargs": kwargs, "lr_scale": lr_scale,
                    "per_update": per_update, "lrs": values})
    return out


if __name__ == "__main__":
    tables = {
        "made_by": {"transformers": transformers.__version__, "timm": timm.__version__, "torch": torch.__version__},
        "group_lrs": GROUP_LRS,
        "cases": hf_cases() + metric_cases() + timm_cases(),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedule_tables.json")
    with open(path, "w") as f:
        json.dump(tables, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {len(tables['cases'])} cases, made by {tables['made_by']}")
