"""Hugging Face's schedules, as pure functions of the step.

``optimizer.get_scheduler`` gives these curves when it is called as transformers'
``get_scheduler`` is (a name of transformers' ``SchedulerType`` and the keywords
``num_warmup_steps`` / ``num_training_steps``): a script that moves from transformers
to this library keeps the learning rate of every step. They follow transformers'
conventions, which differ from ours (``optimizer.scheduler``, Note [warmup]):

* each function returns a *multiplier* of a parameter group's initial lr (transformers
  wraps them in ``LambdaLR``);
* warmup is ``s / W``: step 0 has lr 0 (``cosine_warmup_with_min_lr`` is the exception:
  ``(s + 1) / W``, or from ``warmup_lr_rate``);
* ``constant`` has no warmup at all; ``polynomial`` ends at ``lr_end`` (default 1e-7),
  as a fraction of the optimizer's *default* lr; ``warmup_stable_decay`` decays with a
  cosine by default.

Written from transformers 5.23's definitions and checked against its own values at
every step (``tests/data/schedule_tables.json``, made by
``tests/data/make_schedule_tables.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["NAMES", "make"]


def _warmup(step: int, num_warmup_steps: int) -> float:
    return float(step) / float(max(1, num_warmup_steps))


def _progress(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    return float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))


def _half_cosine(progress: float, num_cycles: float) -> float:
    """1 at progress 0, down to 0 at progress 1 for num_cycles = 0.5."""
    return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))


def constant(step: int) -> float:
    return 1.0


def constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, _half_cosine(_progress(step, num_warmup_steps, num_training_steps), num_cycles))


def cosine_with_restarts(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _progress(step, num_warmup_steps, num_training_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def polynomial(step: int, *, num_warmup_steps: int, num_training_steps: int, lr_init: float, lr_end: float = 1e-7,
               power: float = 1.0) -> float:
    """``lr_init`` is the optimizer's default lr: the curve ends at ``lr_end / lr_init`` of each group's lr."""
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    if step > num_training_steps:
        return lr_end / lr_init
    remaining = 1 - (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def inverse_sqrt(step: int, *, num_warmup_steps: int, timescale: int | None = None) -> float:
    if timescale is None:
        timescale = num_warmup_steps or 10_000
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return 1.0 / math.sqrt((step + timescale - num_warmup_steps) / timescale)


def cosine_with_min_lr(step: int, *, num_warmup_steps: int, num_training_steps: int, min_lr_rate: float,
                       num_cycles: float = 0.5) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    factor = _half_cosine(_progress(step, num_warmup_steps, num_training_steps), num_cycles)
    return max(0, factor * (1 - min_lr_rate) + min_lr_rate)


def cosine_warmup_with_min_lr(step: int, *, num_warmup_steps: int, num_training_steps: int, min_lr_rate: float,
                              num_cycles: float = 0.5, warmup_lr_rate: float | None = None) -> float:
    """Its warmup starts above 0 (``(s + 1) / W``, or from ``warmup_lr_rate``) and its decay is
    one step ahead of ``cosine_with_min_lr``'s."""
    s, w, t = float(step), float(num_warmup_steps), float(num_training_steps)
    if s < w:
        if warmup_lr_rate is None:
            return (s + 1.0) / max(1.0, w)
        return float(warmup_lr_rate) + (1.0 - float(warmup_lr_rate)) * s / max(1, w - 1)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * ((s - w + 1.0) / max(1.0, t - w))))
    return max(0, factor * (1 - min_lr_rate) + min_lr_rate)


_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(step: int, *, num_warmup_steps: int, num_stable_steps: int, num_decay_steps: int,
                        warmup_type: str = "linear", decay_type: str = "cosine", min_lr_ratio: float = 0.0,
                        num_cycles: float = 0.5) -> float:
    """From ``min_lr_ratio`` up to 1 (``warmup_type``), 1 for ``num_stable_steps``, down to
    ``min_lr_ratio`` (``decay_type``) over ``num_decay_steps``, then held there."""
    def lifted(factor: float) -> float:
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)

    if step < num_warmup_steps:
        x = float(step) / float(max(1, num_warmup_steps))
        shapes = {"linear": lambda: x, "cosine": lambda: 0.5 * (1.0 - math.cos(math.pi * x)),
                  "1-sqrt": lambda: 1.0 - math.sqrt(1.0 - x)}
        return lifted(shapes[warmup_type]())
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        x = float(step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        shapes = {"linear": lambda: 1.0 - x, "cosine": lambda: _half_cosine(x, num_cycles),
                  "1-sqrt": lambda: 1.0 - math.sqrt(x)}
        return lifted(shapes[decay_type]())
    return min_lr_ratio


# name -> (the multiplier, does it need num_warmup_steps, does it need num_training_steps)
_SCHEDULES: dict[str, tuple[Callable[..., float], bool, bool]] = {
    "linear": (linear, True, True),
    "cosine": (cosine, True, True),
    "cosine_with_restarts": (cosine_with_restarts, True, True),
    "polynomial": (polynomial, True, True),
    "constant": (constant, False, False),
    "constant_with_warmup": (constant_with_warmup, True, False),
    "inverse_sqrt": (inverse_sqrt, True, False),
    "cosine_with_min_lr": (cosine_with_min_lr, True, True),
    "cosine_warmup_with_min_lr": (cosine_warmup_with_min_lr, True, True),
    "warmup_stable_decay": (warmup_stable_decay, True, False),
}
NAMES = (*_SCHEDULES, "reduce_lr_on_plateau", "greedy")
"""transformers' ``SchedulerType`` names; the last two follow a metric, not the step."""


def make(name: str, *, lr_init: float, num_warmup_steps: int | None = None, num_training_steps: int | None = None,
         **kwargs: Any) -> Callable[[int], float]:
    """The multiplier ``step -> factor`` that transformers' ``get_scheduler(name, optimizer,
    num_warmup_steps, num_training_steps, scheduler_specific_kwargs=kwargs)`` would apply to
    each group's initial lr; ``lr_init`` is the optimizer's default lr. Arguments are checked
    as transformers checks them (the same arguments are required and refused), with errors
    that name them."""
    if name not in _SCHEDULES:
        raise ValueError(f"Invalid schedule name: {name!r}; Hugging Face's are {sorted(NAMES)}")
    fn, needs_warmup, needs_total = _SCHEDULES[name]
    if name == "constant":  # transformers ignores everything else for "constant"
        return fn
    if num_warmup_steps is None:
        raise ValueError(f"Invalid arguments for {name!r}: it requires num_warmup_steps")
    _check_steps("num_warmup_steps", num_warmup_steps)
    args: dict[str, Any] = {"num_warmup_steps": num_warmup_steps}
    if name == "constant_with_warmup":  # transformers passes it nothing else
        return _bind(fn, args)
    if name == "warmup_stable_decay":
        return _bind(fn, _wsd_arguments(num_warmup_steps, num_training_steps, kwargs))
    if needs_total:
        if num_training_steps is None:
            raise ValueError(f"Invalid arguments for {name!r}: it requires num_training_steps")
        _check_steps("num_training_steps", num_training_steps)
        args["num_training_steps"] = num_training_steps
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kwargs = dict(kwargs)
        min_lr, rate = kwargs.pop("min_lr", None), kwargs.pop("min_lr_rate", None)
        if min_lr is not None and rate is not None:
            raise ValueError(f"Invalid arguments for {name!r}: give min_lr or min_lr_rate, not both "
                             f"(got min_lr={min_lr}, min_lr_rate={rate})")
        if min_lr is None and rate is None:
            raise ValueError(f"Invalid arguments for {name!r}: it requires min_lr or min_lr_rate")
        args["min_lr_rate"] = rate if rate is not None else min_lr / lr_init
    if name == "polynomial":
        args["lr_init"] = lr_init
        lr_end = kwargs.get("lr_end", 1e-7)
        if not lr_init > lr_end:
            raise ValueError(f"Invalid lr_end: {lr_end} (must be below the optimizer's lr {lr_init})")
        if num_training_steps <= num_warmup_steps:
            raise ValueError(f"Invalid num_training_steps: {num_training_steps} (polynomial needs more than "
                             f"num_warmup_steps={num_warmup_steps})")
        power = kwargs.get("power", 1.0)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power >= 0:  # (0 ** power at the end)
            raise ValueError(f"Invalid power: {power!r} (must be a number >= 0)")
    if name == "inverse_sqrt":
        timescale = kwargs.get("timescale")
        if timescale is not None and (isinstance(timescale, bool) or not isinstance(timescale, (int, float))
                                      or not timescale > 0):  # (a quotient by it)
            raise ValueError(f"Invalid timescale: {timescale!r} (must be a number > 0, or None)")
    return _bind(fn, {**args, **_known(name, fn, kwargs)})


def _wsd_arguments(num_warmup_steps: int, num_training_steps: int | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if "num_decay_steps" not in kwargs:
        raise ValueError("Invalid arguments for 'warmup_stable_decay': it requires num_decay_steps")
    stable = kwargs.pop("num_stable_steps", None)
    if stable is None:  # transformers prefers num_stable_steps when both are given
        if num_training_steps is None:
            raise ValueError("Invalid arguments for 'warmup_stable_decay': it requires num_training_steps or "
                             "num_stable_steps")
        stable = num_training_steps - num_warmup_steps - kwargs["num_decay_steps"]
    for key in ("warmup_type", "decay_type"):
        if kwargs.get(key, "linear") not in _SHAPES:
            raise ValueError(f"Invalid {key}: {kwargs[key]!r} (must be one of {list(_SHAPES)})")
    return {"num_warmup_steps": num_warmup_steps, "num_stable_steps": stable,
            **_known("warmup_stable_decay", warmup_stable_decay, kwargs)}


def _known(name: str, fn: Callable[..., float], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` if ``fn`` takes them all (as keyword-only options), else an error naming the first it does not."""
    import inspect

    takes = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY
             and p.name not in ("num_warmup_steps", "num_training_steps", "lr_init", "min_lr_rate")]
    for key in kwargs:
        if key not in takes:
            raise ValueError(f"Invalid argument {key!r} for Hugging Face's {name!r}; it takes {sorted(takes)}")
    return kwargs


def _check_steps(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")


def _bind(fn: Callable[..., float], args: dict[str, Any]) -> Callable[[int], float]:
    def multiplier(step: int) -> float:
        return fn(step, **args)

    multiplier.__name__ = fn.__name__
    return multiplier
