"""timm's schedules, as pure functions of the step.

``optimizer.get_scheduler`` gives these curves when it is called with the keywords of
timm's scheduler classes (``t_initial``, ``warmup_t``, ``lr_min``, ...): ``cosine``
(``CosineLRScheduler``), ``tanh``, ``poly``, ``step``, ``multistep`` and ``wsd``. They
follow timm's conventions, which differ from ours (``optimizer.scheduler``) and from
Hugging Face's:

* ``t_initial`` is the length of *one* cycle; ``cycle_limit`` cycles run (each
  ``cycle_mul`` times longer than the last and peaking ``cycle_decay`` times lower),
  then the rate stays at ``lr_min``;
* warmup climbs from ``warmup_lr_init`` by ``(lr - warmup_lr_init) / warmup_t`` a step and
  is laid *over* the start of the curve (``warmup_prefix=False``, the default of the
  cosine, tanh and poly curves): the curve does not wait for it, so the first step after
  warmup is already partway down; with ``warmup_prefix=True`` the curve starts after it;
* ``noise_range_t`` adds timm's reproducible noise (a generator seeded with
  ``noise_seed + t``), and a group's ``lr_scale`` multiplies its rate.

Written from timm 1.0.31's definitions and checked against its own values at every
step (``tests/data/schedule_tables.json``, made by ``tests/data/make_schedule_tables.py``).
Each function gives the rate of a group whose initial lr is ``base_lr`` at step ``t``.
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["NAMES", "make", "noise"]


def _cycle(t: float, t_initial: int, cycle_mul: float) -> tuple[int, float, float]:
    """(index of the cycle holding step t, its length, t's position in it)."""
    if cycle_mul != 1:
        i = math.floor(math.log(1 - t / t_initial * (1 - cycle_mul), cycle_mul))
        length = cycle_mul**i * t_initial
        return i, length, t - (1 - cycle_mul**i) / (1 - cycle_mul) * t_initial
    i = t // t_initial
    return i, t_initial, t - t_initial * i


def _cyclic(shape: Callable[[float, float], float]) -> Callable[..., float]:
    """A curve of timm's cyclic family: ``shape(t_curr, t_i)`` in [0, 1] of the way from
    ``lr_min`` to the cycle's peak, with warmup, cycles and ``lr_min`` after the last cycle."""
    def curve(t: int, *, base_lr: float, t_initial: int, lr_min: float = 0.0, cycle_mul: float = 1.0,
              cycle_decay: float = 1.0, cycle_limit: int = 1, warmup_t: int = 0, warmup_lr_init: float = 0.0,
              warmup_prefix: bool = False, **shape_options: Any) -> float:
        def after_warmup(t: float) -> float:
            if warmup_prefix:
                t = t - warmup_t
            i, t_i, t_curr = _cycle(t, t_initial, cycle_mul)
            if i >= cycle_limit:
                return lr_min
            return shape(lr_min, base_lr * cycle_decay**i, t_curr, t_i, **shape_options)

        if t < warmup_t:
            # tanh's warmup climbs to the curve's value at warmup_t, the others' to base_lr
            target = after_warmup(warmup_t) if shape is _tanh_shape and not warmup_prefix else base_lr
            return warmup_lr_init + t * ((target - warmup_lr_init) / warmup_t)
        return after_warmup(t)

    return curve


def _cosine_shape(lr_min: float, lr_max: float, t_curr: float, t_i: float, k_decay: float = 1.0) -> float:
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr**k_decay / t_i**k_decay))


def _poly_shape(lr_min: float, lr_max: float, t_curr: float, t_i: float, power: float = 0.5,
                k_decay: float = 1.0) -> float:
    return lr_min + (lr_max - lr_min) * (1 - t_curr**k_decay / t_i**k_decay) ** power


def _tanh_shape(lr_min: float, lr_max: float, t_curr: float, t_i: float, lb: float = -7.0, ub: float = 3.0) -> float:
    x = t_curr / t_i
    return lr_min + 0.5 * (lr_max - lr_min) * (1 - math.tanh(lb * (1.0 - x) + ub * x))


cosine = _cyclic(_cosine_shape)
poly = _cyclic(_poly_shape)
tanh = _cyclic(_tanh_shape)


def _warmup(t: int, base_lr: float, warmup_t: int, warmup_lr_init: float) -> float:
    return warmup_lr_init + t * ((base_lr - warmup_lr_init) / warmup_t)


def step(t: int, *, base_lr: float, decay_t: float, decay_rate: float = 1.0, warmup_t: int = 0,
         warmup_lr_init: float = 0.0, warmup_prefix: bool = True) -> float:
    """``base_lr * decay_rate ** (t // decay_t)``."""
    if t < warmup_t:
        return _warmup(t, base_lr, warmup_t, warmup_lr_init)
    if warmup_prefix:
        t = t - warmup_t
    return base_lr * decay_rate ** (t // decay_t)


def multistep(t: int, *, base_lr: float, decay_t: list[int], decay_rate: float = 1.0, warmup_t: int = 0,
              warmup_lr_init: float = 0.0, warmup_prefix: bool = True) -> float:
    """``decay_rate`` once more at each milestone of ``decay_t``, timm's way: milestone m
    applies from ``t == m - 1`` (torch's MultiStepLR applies it from ``t == m``)."""
    if t < warmup_t:
        return _warmup(t, base_lr, warmup_t, warmup_lr_init)
    if warmup_prefix:
        t = t - warmup_t
    return base_lr * decay_rate ** bisect.bisect_right(decay_t, t + 1)


_STABLE = ("constant", "rsqrt", "power")
_DECAY = ("linear", "1-sqrt", "cosine", "power", "exp")


def wsd(t: int, *, base_lr: float, t_initial: int, decay_t: int, lr_min: float = 0.0, stable_fn: str = "constant",
        stable_timescale: float | None = None, stable_power: float = 0.5, decay_fn: str = "1-sqrt",
        decay_power: float = 0.5, decay_ratio: float = 0.1, warmup_t: int = 0, warmup_lr_init: float = 0.0) -> float:
    """Warmup, a stable phase of ``t_initial - decay_t`` steps (constant, or decaying as
    ``(1 + t / timescale) ** -power``, never below ``lr_min``), then a cool-down to
    ``lr_min`` over ``decay_t`` steps; ``t_initial`` counts from the end of warmup."""
    if t < warmup_t:
        return _warmup(t, base_lr, warmup_t, warmup_lr_init)
    t_s = t - warmup_t
    if stable_fn == "constant":
        stable = 1.0
    else:
        timescale = warmup_t if stable_timescale is None else stable_timescale
        stable = (1.0 + t_s / timescale) ** -(0.5 if stable_fn == "rsqrt" else stable_power)
    lr = max(base_lr * stable, lr_min)
    t_decay = t_s - (t_initial - decay_t)
    if t_decay <= 0:
        return lr
    x = min(t_decay / decay_t, 1.0)
    shapes = {"linear": lambda: 1.0 - x, "1-sqrt": lambda: 1.0 - math.sqrt(x),
              "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * x)), "power": lambda: 1.0 - x**decay_power,
              "exp": lambda: (decay_ratio**x - decay_ratio) / (1.0 - decay_ratio)}
    return lr_min + (lr - lr_min) * shapes[decay_fn]()


def noise(t: int, *, noise_range_t: int | list[int] | tuple[int, int] | None = None, noise_pct: float = 0.67,
          noise_std: float = 1.0, noise_seed: int = 42, noise_type: str = "normal") -> float:
    """timm's multiplicative noise at step t (0 outside ``noise_range_t``): reproducible, drawn
    from a generator seeded with ``noise_seed + t``; normal noise is drawn again until it is
    within ``noise_pct``."""
    if noise_range_t is None:
        return 0.0
    if isinstance(noise_range_t, (list, tuple)):
        inside = noise_range_t[0] <= t < noise_range_t[1]
    else:
        inside = t >= noise_range_t
    if not inside:
        return 0.0
    gen = torch.Generator()
    gen.manual_seed(noise_seed + t)
    if noise_type == "normal":
        while True:
            value = torch.randn(1, generator=gen).item() * noise_std
            if abs(value) < noise_pct:
                return value
    return 2 * (torch.rand(1, generator=gen).item() - 0.5) * noise_pct


_CURVES: dict[str, Callable[..., float]] = {"cosine": cosine, "tanh": tanh, "poly": poly, "step": step,
                                            "multistep": multistep, "wsd": wsd}
NAMES = tuple(_CURVES)
_SHAPE_OPTIONS = {"cosine": ("k_decay",), "poly": ("power", "k_decay"), "tanh": ("lb", "ub")}
_NOISE = tuple(p for p in inspect.signature(noise).parameters if p != "t")
# what timm's scheduler classes take besides the curve: handled by the adapter (ScheduleLR)
ADAPTER_KEYWORDS = ("t_in_epochs", "initialize")


def _options(name: str) -> list[str]:
    fn = _CURVES[name]
    if name in _SHAPE_OPTIONS:
        shared = [p for p in inspect.signature(fn).parameters if p not in ("t", "base_lr", "shape_options")]
        return shared + list(_SHAPE_OPTIONS[name])
    return [p for p in inspect.signature(fn).parameters if p not in ("t", "base_lr")]


def make(name: str, base_lr: float, **kwargs: Any) -> Callable[[int], float]:
    """``t -> lr`` of a group whose initial lr is ``base_lr``, as timm's scheduler class
    ``name`` (with these keywords, noise included) sets it at ``step(t)``. Arguments are
    checked as timm checks them, with errors that name them."""
    if name not in _CURVES:
        raise ValueError(f"Invalid schedule name: {name!r}; timm's are {sorted(NAMES)} (for timm's 'plateau', "
                         "use torch.optim.lr_scheduler.ReduceLROnPlateau)")
    noise_args = {k: kwargs.pop(k) for k in _NOISE if k in kwargs}
    takes = _options(name)
    for key in kwargs:
        if key not in takes:
            raise ValueError(f"Invalid argument {key!r} for timm's {name!r}; it takes "
                             f"{sorted(takes + list(_NOISE) + list(ADAPTER_KEYWORDS))}")
    _check(name, kwargs)
    curve = _CURVES[name]

    def lr(t: int) -> float:
        value = curve(t, base_lr=base_lr, **kwargs)
        n = noise(t, **noise_args)
        return value + value * n if n else value

    lr.__name__ = name
    return lr


def _check(name: str, kw: dict[str, Any]) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"Invalid {key}: {kw.get(key)!r} ({rule})")

    def number(key: str, default: float | None = None) -> float:
        """The value of ``key`` where a rule compares it: a finite number, or an error naming it."""
        value = kw.get(key, default)
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
             "must be a finite number")
        return value

    if name in ("cosine", "tanh", "poly", "wsd"):
        need("t_initial" in kw, "t_initial", "required")
        need(number("t_initial") > 0, "t_initial", "must be > 0")
        need(number("lr_min", 0.0) >= 0, "lr_min", "must be >= 0")
    if name in ("cosine", "tanh", "poly"):  # (a cycle's length is t_initial times a power of it)
        need(number("cycle_mul", 1.0) > 0, "cycle_mul", "must be > 0")
    if name in ("step", "multistep"):
        need("decay_t" in kw, "decay_t", "required")
    if name == "step":  # (t // decay_t)
        need(number("decay_t") > 0, "decay_t", "must be > 0")
    if name == "multistep":
        milestones = kw["decay_t"]
        need(isinstance(milestones, (list, tuple)) and all(isinstance(m, (int, float)) and not isinstance(m, bool)
                                                            for m in milestones), "decay_t", "a list of steps")
        need(list(milestones) == sorted(milestones), "decay_t", "milestones must be sorted")
    if name == "tanh":
        need(number("lb", -7.0) < number("ub", 3.0), "lb", "must be below ub")
    if name == "wsd":
        need("decay_t" in kw, "decay_t", "required")
        need(0 < number("decay_t") <= kw["t_initial"], "decay_t", "must be in (0, t_initial]")
        need(kw.get("stable_fn", "constant") in _STABLE, "stable_fn", f"one of {list(_STABLE)}")
        need(kw.get("decay_fn", "1-sqrt") in _DECAY, "decay_fn",
             f"one of {list(_DECAY)}; a callable cannot be saved in a state_dict")
        need(0 < number("decay_ratio", 0.1) < 1, "decay_ratio", "must be in (0, 1)")
        need(number("decay_power", 0.5) > 0, "decay_power", "must be > 0")
        need(number("stable_power", 0.5) > 0, "stable_power", "must be > 0")
        if kw.get("stable_fn", "constant") != "constant":
            timescale = kw.get("stable_timescale", kw.get("warmup_t", 0))
            need(timescale is not None and timescale > 0, "stable_timescale",
                 "a decaying stable_fn needs a positive timescale; it defaults to warmup_t")
