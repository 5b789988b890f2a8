r"""The schedule family as pure functions of the step: ``step -> lr``.

Layout (top to bottom): the pieces (warmup, decay shapes), the schedules
(``constant``, ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``,
``exponential``, ``inverse_sqrt``, ``warmup_stable_decay``) and ``make_schedule``,
which checks the arguments once and returns such a function. ``scheduler.py``
puts them behind torch's ``LRScheduler``.

Note [warmup]
~~~~~~~~~~~~~
With ``W = warmup_steps`` and peak ``P``, warmup is the straight line

    lr(s) = P * (s + 1) / (W + 1)         for 0 <= s < W

so step 0 already moves the parameters (lr = P / (W + 1), never 0), the rate rises
strictly, and it reaches ``P`` at ``s = W``, the end of warmup, where the decay starts
from ``P``. Hugging Face's schedules (and the Intro2LLM lesson L07's formula) use
``P * s / W`` instead, which is 0 at step 0; this is the one place our own schedules
deliberately differ from theirs. ``get_scheduler`` with Hugging Face's keywords gives
their curve (Note [whose curve] in scheduler.py); why ours differs, and the lesson's own
test of step 0: docs/algorithms.md, "The course material".

Note [end of the schedule]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Decays run over ``[W, T]`` with ``T = total_steps`` and progress
``x = (s - W) / (T - W)``, clipped to [0, 1]: the floor ``min_lr`` is reached at ``s = T``
and held for every later step (no rise, no error). That is our choice, not a shared
convention: torch's ``CosineAnnealingLR`` is a cosine of period ``2 T_max`` and climbs
back after ``T_max``, and Hugging Face's ``cosine`` schedules (like the lesson L07's
formula evaluated past ``T``) continue their cosine upwards (tests/test_guides.py).
With ``W == T`` (warmup only) the peak is reached at ``s = W`` and the floor one step
later. Steps count in whatever unit the loop calls ``scheduler.step()`` in: optimizer
steps or epochs.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

__all__ = ["SCHEDULES", "constant", "cosine", "cosine_with_restarts", "exponential", "inverse_sqrt", "linear",
           "make_schedule", "polynomial", "warmup_stable_decay"]


# ---------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------

def _warmup(step: int, warmup_steps: int, peak_lr: float) -> float:
    """Note [warmup]."""
    return peak_lr * (step + 1) / (warmup_steps + 1)


def _progress(step: int, start: int, end: int) -> float:
    """Fraction of [start, end] done at ``step``, clipped to [0, 1]: 0 at ``start`` (the peak),
    1 from ``end`` on. A decay of no length (``start == end``) takes one step, as Hugging
    Face's ``max(1, T - W)`` does: the peak is still reached at ``start``."""
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


def _cosine_shape(x: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


def _interpolate(peak_lr: float, min_lr: float, shape: float) -> float:
    """min_lr + (peak_lr - min_lr) * shape, shape in [0, 1] (1 at the peak)."""
    return min_lr + (peak_lr - min_lr) * shape


_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": _cosine_shape,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


# ---------------------------------------------------------------------------
# schedules: pure functions of the step (all keyword arguments after ``step``)
# ---------------------------------------------------------------------------

def constant(step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int | None = None) -> float:
    """Warmup (Note [warmup]), then ``peak_lr`` for ever (``total_steps`` is only checked >= W)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    return peak_lr


def linear(step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0) -> float:
    """Warmup, then a straight line from ``peak_lr`` at W to ``min_lr`` at T."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    return _interpolate(peak_lr, min_lr, 1.0 - _progress(step, warmup_steps, total_steps))


def cosine(step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0) -> float:
    r"""Warmup, then half a cosine from ``peak_lr`` at W to ``min_lr`` at T:

    lr(s) = min_lr + (peak_lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    return _interpolate(peak_lr, min_lr, _cosine_shape(_progress(step, warmup_steps, total_steps)))


def cosine_with_restarts(
    step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0,
    num_cycles: int = 1,
) -> float:
    """Warmup, then ``num_cycles`` equal cosine decays from ``peak_lr`` to ``min_lr``, each
    restarting at the peak (SGDR's hard restarts, Loshchilov & Hutter 2017); floor from T on."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    x = _progress(step, warmup_steps, total_steps)
    if x >= 1.0:
        return min_lr
    return _interpolate(peak_lr, min_lr, _cosine_shape((x * num_cycles) % 1.0))


def polynomial(
    step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """Warmup, then ``min_lr + (peak_lr - min_lr) * (1 - x) ** power``; power 1 is linear."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    return _interpolate(peak_lr, min_lr, (1.0 - _progress(step, warmup_steps, total_steps)) ** power)


def exponential(
    step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int | None = None,
    min_lr: float = 0.0, gamma: float | None = None,
) -> float:
    """Warmup, then ``peak_lr * gamma ** (s - W)``, never below ``min_lr``.

    Without ``gamma``, it is chosen so that the rate reaches ``min_lr`` (> 0) exactly at T.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    if gamma is None:
        if total_steps is None or total_steps <= warmup_steps:  # ruled out by make_schedule
            return peak_lr
        gamma = (min_lr / peak_lr) ** (1.0 / (total_steps - warmup_steps)) if peak_lr > 0 else 1.0
    try:
        decayed = gamma ** (step - warmup_steps)
    except OverflowError:  # a step beyond float range (> 1e308): gamma <= 1, so the limit
        decayed = 0.0 if gamma < 1 else 1.0
    return max(min_lr, peak_lr * decayed)


def inverse_sqrt(
    step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int | None = None,
    timescale: int | None = None,
) -> float:
    """Warmup, then ``peak_lr * sqrt(tau / (s - W + tau))``, the Transformer paper's decay,
    continuous at W; ``tau = timescale``, by default W (10,000 without warmup).
    ``total_steps`` is only checked >= W: the decay has no end."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    tau = timescale if timescale is not None else (warmup_steps or 10_000)
    return peak_lr * math.sqrt(tau / (step - warmup_steps + tau))


def warmup_stable_decay(
    step: int, *, peak_lr: float = 1.0, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0,
    decay_steps: int | None = None, decay_ratio: float = 0.2, decay_type: str = "1-sqrt",
) -> float:
    """Warmup, hold ``peak_lr``, then cool down to ``min_lr`` over the last ``decay_steps``
    (default ``decay_ratio`` of all steps) with a linear, cosine or 1-sqrt shape
    (Hu et al. 2024, MiniCPM; Hägele et al. 2024 recommend 1-sqrt)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    if decay_steps is None:
        decay_steps = round(decay_ratio * total_steps)
    start = max(warmup_steps, total_steps - decay_steps)
    if step < start:
        return peak_lr
    return _interpolate(peak_lr, min_lr, _DECAY_SHAPES[decay_type](_progress(step, start, total_steps)))


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "cosine_with_restarts": cosine_with_restarts,
    "polynomial": polynomial,
    "exponential": exponential,
    "inverse_sqrt": inverse_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
}
"""Every schedule of the family by its canonical name: the one list the factory, CLI and tests use."""

# names Hugging Face / timm users type for the same schedules
_NAME_ALIASES = {
    "constant_with_warmup": "constant",
    "cosine_with_min_lr": "cosine",
    "cosine_warmup_with_min_lr": "cosine",
    "warmup_cosine": "cosine",
    "cosine_with_hard_restarts": "cosine_with_restarts",
    "poly": "polynomial",
    "exp": "exponential",
    "rsqrt": "inverse_sqrt",
    "wsd": "warmup_stable_decay",
}

def _parameters(fn: Callable[..., float]) -> dict[str, inspect.Parameter]:
    return dict(list(inspect.signature(fn).parameters.items())[1:])


def _check_int(name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {minimum})")


def _check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number in {bounds})")


def make_schedule(name: str, **kwargs: Any) -> Callable[[int], float]:
    """Check the arguments of schedule ``name`` once; return the pure function ``step -> lr``.

    >>> lr = make_schedule("cosine", peak_lr=3e-4, warmup_steps=100, total_steps=1000, min_lr=3e-5)
    >>> lr(100), lr(1000)
    (0.0003, 3e-05)
    """
    if name not in SCHEDULES:
        raise ValueError(f"Invalid schedule name: {name!r}; valid names are {sorted(SCHEDULES)}")
    fn = SCHEDULES[name]
    params = _parameters(fn)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"Invalid argument {unknown[0]!r} for schedule {name!r}; it takes {sorted(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"Missing argument {missing[0]!r} for schedule {name!r}")
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update(kwargs)

    _check_number("peak_lr", args["peak_lr"], high=math.inf)
    _check_int("warmup_steps", args["warmup_steps"])
    total = args.get("total_steps")
    if total is not None:
        _check_int("total_steps", total, minimum=1)
        if args["warmup_steps"] > total:
            raise ValueError(f"Invalid warmup_steps: {args['warmup_steps']} is larger than total_steps={total}")
    if "min_lr" in args:
        _check_number("min_lr", args["min_lr"])
        if args["min_lr"] > args["peak_lr"]:
            raise ValueError(f"Invalid min_lr: {args['min_lr']} is above the peak learning rate {args['peak_lr']}")
    if "num_cycles" in args:
        _check_int("num_cycles", args["num_cycles"], minimum=1)
    if "power" in args:
        _check_number("power", args["power"], low=0.0)
        if args["power"] <= 0:
            raise ValueError(f"Invalid power: {args['power']} (must be > 0)")
    if name == "exponential":
        if args["gamma"] is not None:
            _check_number("gamma", args["gamma"], low=0.0, high=1.0)
        elif total is None or args["min_lr"] <= 0 or total == args["warmup_steps"]:
            raise ValueError(
                "Invalid arguments for schedule 'exponential': give gamma, or total_steps > warmup_steps "
                f"and min_lr > 0 to reach min_lr at total_steps (got gamma=None, total_steps={total}, "
                f"min_lr={args['min_lr']})"
            )
    if "timescale" in args and args["timescale"] is not None:
        _check_int("timescale", args["timescale"], minimum=1)
    if name == "warmup_stable_decay":
        if args["decay_type"] not in _DECAY_SHAPES:
            raise ValueError(f"Invalid decay_type: {args['decay_type']!r}; valid are {sorted(_DECAY_SHAPES)}")
        _check_number("decay_ratio", args["decay_ratio"], high=1.0)
        if args["decay_steps"] is not None:
            _check_int("decay_steps", args["decay_steps"])
            if args["decay_steps"] > total - args["warmup_steps"]:
                raise ValueError(
                    f"Invalid decay_steps: {args['decay_steps']} is more than total_steps - warmup_steps "
                    f"= {total - args['warmup_steps']}"
                )

    def schedule(step: int) -> float:
        _check_int("step", step)
        return fn(step, **args)

    schedule.__name__ = name
    return schedule
