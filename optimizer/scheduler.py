r"""Learning-rate schedules: pure functions of the step, behind one thin
``torch.optim.lr_scheduler.LRScheduler`` adapter.

Layout (top to bottom): the pieces (warmup, decay shapes), the schedules as
pure functions ``step -> lr``, ``make_schedule`` (checks arguments once and
returns such a function), the adapter ``ScheduleLR``, ``WarmupCosineScheduler``
(the Intro2LLM lesson L07's class), the same adapter around Hugging Face's and
timm's curves (``HFScheduleLR``, ``TimmScheduleLR``), and the ``get_scheduler``
factory (Note [whose curve]).

Note [warmup]
~~~~~~~~~~~~~
With ``W = warmup_steps`` and peak ``P``, warmup is the straight line

    lr(s) = P * (s + 1) / (W + 1)         for 0 <= s < W

so step 0 already trains (lr = P / (W + 1), never 0: a zero first update is a
wasted step), the rate rises strictly, and it reaches ``P`` at ``s = W``, the
end of warmup, where the decay starts from ``P``. Hugging Face's schedules use
``P * s / W`` instead, which spends step 0 at lr 0; this is the one place our
own schedules deliberately differ from theirs.

Note [whose curve]
~~~~~~~~~~~~~~~~~~
``get_scheduler`` serves users of three libraries, and its keywords say whose
conventions they expect: called as transformers' ``get_scheduler`` is
(``num_warmup_steps`` / ``num_training_steps``) it gives Hugging Face's curves
(``hf_schedules.py``, :class:`HFScheduleLR`); with the keywords of timm's scheduler
classes (``t_initial``, ``decay_t``) timm's (``timm_schedules.py``,
:class:`TimmScheduleLR`); with ours (``warmup_steps`` / ``total_steps``) ours. A user
who moves a training script here keeps the learning rate of every step.

Note [end of the schedule]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Decays run over ``[W, T]`` with ``T = total_steps`` and progress
``x = (s - W) / (T - W)``: the floor ``min_lr`` is reached at ``s = T`` and held
for every later step (no re-rise, no error), as torch's ``CosineAnnealingLR``
and the Intro2LLM lesson L07's formula do. With ``W == T`` (warmup only) the peak
is reached at ``s = W`` and the floor one step later. Steps count in whatever unit the loop calls
``scheduler.step()`` in: optimizer steps or epochs.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import hf_schedules, timm_schedules
from ._greedy import GreedyLR

__all__ = [
    "SCHEDULES",
    "HFScheduleLR",
    "ScheduleLR",
    "TimmScheduleLR",
    "WarmupCosineScheduler",
    "constant",
    "cosine",
    "cosine_with_restarts",
    "exponential",
    "get_scheduler",
    "inverse_sqrt",
    "linear",
    "make_schedule",
    "polynomial",
    "warmup_stable_decay",
]


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


# ---------------------------------------------------------------------------
# the torch adapter
# ---------------------------------------------------------------------------

def _plain(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class ScheduleLR(LRScheduler):
    """Drives ``optimizer``'s learning rates with a schedule of :data:`SCHEDULES`.

    Each parameter group's peak is its own ``lr`` (its ``initial_lr`` when
    resuming); its floor is ``min_lr`` (absolute, the same for every group) or
    ``min_lr_ratio * peak`` (per group). ``step()`` advances one step (the torch
    convention), ``step(s)`` sets the rate of step ``s``; the rate of step 0 is
    set on construction. ``get_lr(s)`` is a pure function returning a float.

    With ``optimizer=None`` the schedule can be inspected or plotted without a
    model; the peak then is ``peak_lr`` (default 1.0, so values are multipliers).

    A real ``torch.optim.lr_scheduler.LRScheduler``: ``get_last_lr()``,
    ``state_dict()`` (plain numbers and strings only, loads with
    ``weights_only=True``) and ``load_state_dict()``; it never patches
    ``optimizer.step``. :class:`HFScheduleLR` and :class:`TimmScheduleLR` are the
    same adapter around Hugging Face's and timm's curves.
    """

    like = "ours"  # whose conventions the curves follow (Note [warmup])

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        schedule: str = "cosine",
        *,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr: float | None = None,
        min_lr_ratio: float | None = None,
        peak_lr: float = 1.0,
        last_epoch: int = -1,
        **options: Any,
    ) -> None:
        if min_lr is not None and min_lr_ratio is not None:
            raise ValueError(
                f"Give min_lr or min_lr_ratio, not both (got min_lr={min_lr}, min_lr_ratio={min_lr_ratio})"
            )
        if min_lr_ratio is not None:
            _check_number("min_lr_ratio", min_lr_ratio, high=1.0)
        self.schedule = _canonical_name(schedule)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.min_lr_ratio = min_lr_ratio
        self.options = dict(options)
        self._start(optimizer, peak_lr, last_epoch)

    def _start(self, optimizer: torch.optim.Optimizer | None, peak_lr: float, last_epoch: int) -> None:
        """What every convention shares: the groups' peaks (``initial_lr``), the curves, step 0."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not isinstance(last_epoch, int) or isinstance(last_epoch, bool) or last_epoch < -1:
            raise ValueError(f"Invalid last_epoch: {last_epoch!r} (must be an integer >= -1)")
        self.optimizer = optimizer
        if optimizer is None:
            self.base_lrs = [_plain(peak_lr)]
        elif last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"].clone() if isinstance(group["lr"], Tensor) else group["lr"])
            self.base_lrs = [_plain(g["initial_lr"]) for g in optimizer.param_groups]
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{i}] has no 'initial_lr': resuming with last_epoch={last_epoch} needs the "
                        "optimizer's state loaded first (or build the scheduler with last_epoch=-1 and load its state_dict)"
                    )
            self.base_lrs = [_plain(g["initial_lr"]) for g in optimizer.param_groups]
        self._build()
        self.last_epoch = last_epoch
        self._step_count = 0
        self.step()

    # The schedule functions are rebuilt from these plain values (never pickled).
    def _build(self) -> None:
        common: dict[str, Any] = {"warmup_steps": self.warmup_steps, **self.options}
        takes = _parameters(SCHEDULES[self.schedule])
        if self.total_steps is not None:
            common["total_steps"] = self.total_steps
        self._fns = []
        for i, peak in enumerate(self.base_lrs):
            args = dict(common, peak_lr=peak)
            if "min_lr" in takes:
                if self.min_lr is not None:
                    if self.min_lr > peak:
                        where = f" of param_groups[{i}]" if self.optimizer is not None else ""
                        raise ValueError(f"Invalid min_lr: {self.min_lr} is above the peak lr {peak}{where}")
                    args["min_lr"] = self.min_lr
                else:
                    args["min_lr"] = (self.min_lr_ratio or 0.0) * peak
            elif self.min_lr is not None or self.min_lr_ratio:
                raise ValueError(f"Invalid argument: schedule {self.schedule!r} has no floor (min_lr / min_lr_ratio)")
            self._fns.append(make_schedule(self.schedule, **args))

    def get_lr(self, step: int | None = None, group: int = 0) -> float | list[float]:  # type: ignore[override]
        """``get_lr(step)``: the rate of ``group`` at ``step``, a float; changes nothing.

        ``get_lr()``: torch's meaning, one rate per group at the current step.
        """
        if step is None:
            return [fn(max(self.last_epoch, 0)) for fn in self._fns]
        return self._fns[group](step)

    def step(self, step: int | None = None) -> None:  # type: ignore[override]
        """Advance one step, or with ``step`` set the rates for that step."""
        if step is None:
            step = self.last_epoch + 1
        _check_int("step", step)
        self._step_count += 1
        self.last_epoch = step
        self._set([fn(step) for fn in self._fns])

    def _set(self, lrs: list[float]) -> None:
        if self.optimizer is not None:
            for group, lr in zip(self.optimizer.param_groups, lrs):
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        self._last_lr = lrs

    # what a state_dict must hold to rebuild the curves, besides last_epoch and base_lrs
    _state_keys: tuple[str, ...] = ("schedule", "warmup_steps", "total_steps", "options")

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_fns")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        required = {"base_lrs", "last_epoch", *self._state_keys}
        missing = sorted(required - set(state_dict))
        if missing:
            raise ValueError(f"Invalid state_dict for {type(self).__name__}: missing {missing}")
        if len(state_dict["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"Invalid state_dict: it has {len(state_dict['base_lrs'])} learning rates, "
                f"the optimizer has {len(self.base_lrs)} parameter groups"
            )
        previous = dict(self.__dict__)
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "_fns", "like")})
        try:
            if type(self) is ScheduleLR:
                self.schedule = _canonical_name(self.schedule)
            self._build()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(previous)
            raise


class WarmupCosineScheduler(ScheduleLR):
    r"""Linear warmup, then cosine decay to a floor (the Intro2LLM lesson L07's class).

    For step ``s``, warmup ``W``, total ``T``, peak ``P`` (the group's lr) and
    floor ``F = min_lr`` or ``min_lr_ratio * P`` (default ratio 0.1):

    .. code-block:: text

        lr(s) = P * (s + 1) / (W + 1)                              0 <= s < W
        lr(s) = F + (P - F) * (1 + cos(pi * (s - W) / (T - W))) / 2    W <= s < T
        lr(s) = F                                                  s >= T

    Step 0 is never 0 (Note [warmup]), the peak is reached at ``s = W``, the
    floor at ``s = T`` and held after it (Note [end of the schedule]).

    ``step(step)`` sets the rate for ``step`` (the lesson's call);
    ``step()`` advances by one (torch's). ``get_lr(step)`` returns a float.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float | None = None,
        *,
        min_lr: float | None = None,
        peak_lr: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if min_lr_ratio is None and min_lr is None:
            min_lr_ratio = 0.1
        super().__init__(
            optimizer, "cosine", warmup_steps=warmup_steps, total_steps=total_steps,
            min_lr=min_lr, min_lr_ratio=min_lr_ratio, peak_lr=peak_lr, last_epoch=last_epoch,
        )


class HFScheduleLR(ScheduleLR):
    """Hugging Face's schedule ``name`` (``optimizer.hf_schedules``): what transformers'
    ``get_scheduler(name, optimizer, num_warmup_steps, num_training_steps,
    scheduler_specific_kwargs)`` gives, as the same adapter as :class:`ScheduleLR`. Each
    group's rate is its initial lr times transformers' multiplier, from step 0 (set on
    construction) on: ``step()`` advances one step, as ``LambdaLR``'s does."""

    like = "transformers"
    _state_keys = ("schedule", "num_warmup_steps", "num_training_steps", "options", "lr_init")

    def __init__(self, optimizer: torch.optim.Optimizer | None, name: str, num_warmup_steps: int | None = None,
                 num_training_steps: int | None = None, *, peak_lr: float = 1.0, last_epoch: int = -1,
                 **scheduler_specific_kwargs: Any) -> None:
        self.schedule = name
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.options = dict(scheduler_specific_kwargs)
        # transformers reads the optimizer's default lr (polynomial's lr_init, min_lr as a rate)
        self.lr_init = _plain(optimizer.defaults["lr"]) if optimizer is not None else _plain(peak_lr)
        self._start(optimizer, peak_lr, last_epoch)

    def _build(self) -> None:
        factor = hf_schedules.make(self.schedule, lr_init=self.lr_init, num_warmup_steps=self.num_warmup_steps,
                                   num_training_steps=self.num_training_steps, **self.options)
        self._fns = [functools.partial(_scaled, factor, base) for base in self.base_lrs]


def _scaled(factor: Callable[[int], float], base: float, step: int) -> float:
    return base * factor(step)


class TimmScheduleLR(ScheduleLR):
    """timm's schedule ``name`` (``optimizer.timm_schedules``): what timm's scheduler class
    (``CosineLRScheduler(optimizer, t_initial, ...)`` and the others) sets, as the same
    adapter as :class:`ScheduleLR`, with timm's calls: ``step(epoch)`` sets the rate of
    ``epoch`` and ``step_update(num_updates)`` that of an update count, whichever
    ``t_in_epochs`` says drives it (the other does nothing). A group's ``lr_scale``
    multiplies its rate, as in timm. On construction the rate is ``warmup_lr_init`` with a
    warmup, else the group's lr, as timm sets it; ``step()`` with no argument advances one."""

    like = "timm"
    _state_keys = ("schedule", "options", "t_in_epochs")

    def __init__(self, optimizer: torch.optim.Optimizer | None, name: str, *, t_in_epochs: bool = True,
                 initialize: bool = True, peak_lr: float = 1.0, **kwargs: Any) -> None:
        if not initialize and optimizer is not None:
            missing = [i for i, g in enumerate(optimizer.param_groups) if "initial_lr" not in g]
            if missing:
                raise KeyError(f"initial_lr missing from param_groups[{missing[0]}] (initialize=False)")
        self.schedule = name
        self.t_in_epochs = bool(t_in_epochs)
        self.options = dict(kwargs)
        self._start(optimizer, peak_lr, -1)

    def _build(self) -> None:
        self._fns = [timm_schedules.make(self.schedule, base, **self.options) for base in self.base_lrs]

    def step(self, epoch: int | None = None, metric: Any = None) -> None:  # type: ignore[override]
        """timm's ``step(epoch)``: the rate of ``epoch`` if ``t_in_epochs``; on construction (and
        ``step()`` before any other call), timm's initial rate."""
        if self._step_count == 0 and epoch is None:  # construction: timm sets the initial rate
            self._step_count = 1
            self.last_epoch = 0
            warm = self.options.get("warmup_t", 0)
            self._set([self.options.get("warmup_lr_init", 0.0) if warm else base for base in self.base_lrs])
            return
        if self.t_in_epochs:
            super().step(epoch)

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        """timm's ``step_update(num_updates)``: the rate of that update count unless ``t_in_epochs``."""
        if not self.t_in_epochs:
            super().step(num_updates)

    def _set(self, lrs: list[float]) -> None:
        if self.optimizer is not None:
            lrs = [lr * g["lr_scale"] if "lr_scale" in g else lr for g, lr in zip(self.optimizer.param_groups, lrs)]
        super()._set(lrs)


def _canonical_name(name: Any) -> str:
    name = getattr(name, "value", name)  # an Enum such as Hugging Face's SchedulerType
    key = _NAME_ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in SCHEDULES:
        valid = sorted(SCHEDULES) + sorted(_NAME_ALIASES)
        raise ValueError(f"Invalid schedule name: {name!r}; valid names are {valid}")
    return key


# Note [whose curve]: which keywords make get_scheduler follow whose conventions
_OUR_STEPS = ("warmup_steps", "total_steps")
_TIMM_STEPS = ("t_initial", "decay_t")
_TORCH_KEYWORDS = ("T_max", "eta_min", "T_0", "T_mult", "step_size", "milestones", "gamma")


def get_scheduler(
    name: Any,
    optimizer: torch.optim.Optimizer | None,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> LRScheduler | ReduceLROnPlateau:
    """Build a scheduler by name; the keywords say whose curve you get (Note [whose curve]).

    * Called as transformers' ``get_scheduler`` is (a name of its ``SchedulerType``,
      ``num_warmup_steps``, ``num_training_steps``, the schedule's own keywords in
      ``scheduler_specific_kwargs`` or as keyword arguments): **Hugging Face's** curve, step
      0 included (``optimizer.hf_schedules``); ``reduce_lr_on_plateau`` is torch's
      ``ReduceLROnPlateau``, as in transformers.
    * With the keywords of timm's scheduler classes (``t_initial``, or ``decay_t`` for
      ``step``/``multistep``; ``warmup_t``, ``lr_min``, ``cycle_limit``, ...) and timm's names
      (``cosine``, ``tanh``, ``poly``, ``step``, ``multistep``, ``wsd``): **timm's** curve
      (``optimizer.timm_schedules``).
    * With ours (``warmup_steps``, ``total_steps``, ``min_lr``, ``min_lr_ratio``, and each
      schedule's own): **ours** (:data:`SCHEDULES`, Note [warmup]), as :class:`ScheduleLR`.
      A name only we have (``exponential``) is ours too.
    """
    name = getattr(name, "value", name)  # an Enum such as Hugging Face's SchedulerType
    given = {**(scheduler_specific_kwargs or {}), **kwargs}
    last_epoch = given.pop("last_epoch", -1)
    torch_keys = sorted(k for k in given if k in _TORCH_KEYWORDS and k != "gamma")
    if torch_keys:
        raise ValueError(f"Invalid argument {torch_keys[0]!r}: that is a torch.optim.lr_scheduler keyword; use "
                         "torch's scheduler itself, or this function's keywords (Hugging Face's, timm's or ours)")
    hf = num_warmup_steps is not None or num_training_steps is not None
    timm = any(k in given for k in _TIMM_STEPS)
    ours = any(k in given for k in _OUR_STEPS) or (
        not hf and not timm and isinstance(name, str) and name not in hf_schedules.NAMES)
    if hf + timm + ours > 1:
        kinds = [k for k, on in (("Hugging Face's (num_warmup_steps, num_training_steps)", hf),
                                 ("timm's (t_initial, decay_t)", timm), ("ours (warmup_steps, total_steps)", ours))
                 if on]
        raise ValueError(f"Invalid arguments: they mix the step counts of {' and '.join(kinds)}; use one convention")
    if timm:
        return TimmScheduleLR(optimizer, name, **given)
    if ours:
        return ScheduleLR(optimizer, name, last_epoch=last_epoch, **given)
    if name not in hf_schedules.NAMES:
        raise ValueError(f"Invalid schedule name: {name!r}; Hugging Face's are {sorted(hf_schedules.NAMES)}, "
                         f"timm's (with t_initial) {sorted(timm_schedules.NAMES)}, ours (with warmup_steps / "
                         f"total_steps) {sorted(SCHEDULES)}")
    if name == "reduce_lr_on_plateau":
        if optimizer is None:
            raise ValueError("Invalid optimizer: reduce_lr_on_plateau follows a metric and needs the optimizer")
        return ReduceLROnPlateau(optimizer, **given)
    if name == "greedy":
        if optimizer is None:
            raise ValueError("Invalid optimizer: greedy follows a metric and needs the optimizer")
        return GreedyLR(optimizer, **given)
    return HFScheduleLR(optimizer, name, num_warmup_steps, num_training_steps, last_epoch=last_epoch, **given)
