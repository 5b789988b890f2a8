r"""Learning-rate schedules: pure functions of the step, behind one thin
``torch.optim.lr_scheduler.LRScheduler`` adapter.

Layout (top to bottom): the adapter ``ScheduleLR`` around a pure function of the
step (``schedules.py``: the family and ``make_schedule``), ``WarmupCosineScheduler``
(the Intro2LLM lesson L07's class), the same adapter around Hugging Face's and
timm's curves (``HFScheduleLR``, ``TimmScheduleLR``), and the ``get_scheduler``
factory (Note [whose curve]). The adapters and the one factory that chooses between
them stay together.

Note [whose curve]
~~~~~~~~~~~~~~~~~~
``get_scheduler`` serves users of three libraries, and its keywords say whose
conventions they expect: called as transformers' ``get_scheduler`` is
(``num_warmup_steps`` / ``num_training_steps``) it gives Hugging Face's curves
(``hf_schedules.py``, :class:`HFScheduleLR`); with the keywords of timm's scheduler
classes (``t_initial``, ``decay_t``) timm's (``timm_schedules.py``,
:class:`TimmScheduleLR`); with ours (``warmup_steps`` / ``total_steps``) ours. A user
who moves a training script here keeps the learning rate of every step.

The curves themselves, and Notes [warmup] and [end of the schedule], are in ``schedules.py``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import hf_schedules, timm_schedules
from ._greedy import GreedyLR
from .schedules import (
    _NAME_ALIASES,
    SCHEDULES,
    _check_int,
    _check_number,
    _parameters,
    constant,
    cosine,
    cosine_with_restarts,
    exponential,
    inverse_sqrt,
    linear,
    make_schedule,
    polynomial,
    warmup_stable_decay,
)

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
            raise TypeError(
                f"Invalid optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
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
                        "optimizer's state loaded first (or build the scheduler with last_epoch=-1 and load its "
                        "state_dict)"
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

    # what a state_dict must hold to rebuild the curves, besides last_epoch and base_lrs, and what
    # else it may hold; _STATE_RULES says what each must be
    _state_keys: tuple[str, ...] = ("schedule", "warmup_steps", "total_steps", "options")
    _optional_state_keys: tuple[str, ...] = ("min_lr", "min_lr_ratio")

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_fns")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave. Every key is checked and the curves are rebuilt
        before anything changes: a bad state_dict raises a one-line ``ValueError`` naming its
        key and leaves the scheduler as it was."""
        values, fns = self._checked_state(state_dict)
        self.__dict__.update(values)
        self._fns = fns

    def _checked_state(self, state_dict: Any) -> tuple[dict[str, Any], list[Callable[[int], float]]]:
        """The attributes ``state_dict`` sets and the curves they make, without changing ``self``."""
        where = f"Invalid state_dict for {type(self).__name__}"
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        required = ("base_lrs", "last_epoch", *self._state_keys)
        missing = sorted(set(required) - set(state_dict))
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        known = {*required, *self._optional_state_keys, "_step_count", "_last_lr"}
        ignored = ("optimizer", "_fns", "like")  # never loaded (the optimizer is this scheduler's own)
        for key, value in state_dict.items():
            if key in ignored:
                continue
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r} (a {type(self).__name__} holds {sorted(known)})")
            ok, rule = _STATE_RULES[key]
            if not ok(value):
                raise ValueError(f"{where}: {key!r} is {value!r} (must be {rule})")
        n = len(self.base_lrs)
        for key in ("base_lrs", "_last_lr"):
            if key in state_dict and len(state_dict[key]) != n:
                raise ValueError(f"{where}: {key!r} has {len(state_dict[key])} learning rates, the optimizer has "
                                 f"{n} parameter groups")
        values = {k: v for k, v in state_dict.items() if k not in ignored}
        values["base_lrs"] = list(values["base_lrs"])
        trial = object.__new__(type(self))  # the curves built on a copy: self changes only once they are
        trial.__dict__.update(self.__dict__)
        trial.__dict__.update(values)
        try:
            if type(self)._build is ScheduleLR._build:
                trial.schedule = values["schedule"] = _canonical_name(trial.schedule)
            trial._build()
            for fn in trial._fns:  # the rates of this step and the next: no error waits for the next step()
                fn(values["last_epoch"])
                fn(values["last_epoch"] + 1)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        except (TypeError, ArithmeticError, LookupError) as err:
            keys = ", ".join(repr(k) for k in self._state_keys)
            raise ValueError(f"{where}: its {keys} make no schedule ({type(err).__name__}: {err})") from None
        return values, trial._fns


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

    ``step(step)`` sets the rate for ``step`` (the call of the Intro2LLM lesson L07);
    ``step()`` advances by one (torch's). ``get_lr(step)`` returns a float. The lesson's
    own formula, warmup ``P * s / W``, is Hugging Face's ``cosine_with_min_lr``:
    ``get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=W,
    num_training_steps=T, min_lr_rate=0.1)`` (docs/algorithms.md, "The course material").
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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _are_rates(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_real(v) and v >= 0 for v in value)


# What each key of a scheduler's state_dict must be (load_state_dict checks them all first)
_STATE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "base_lrs": (_are_rates, "a list of finite learning rates >= 0"),
    "_last_lr": (_are_rates, "a list of finite learning rates >= 0"),
    "last_epoch": (_is_int, "an integer >= 0"),
    "_step_count": (_is_int, "an integer >= 0"),
    "schedule": (lambda v: isinstance(v, str), "a schedule name"),
    "options": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of keyword arguments"),
    "warmup_steps": (_is_int, "an integer >= 0"),
    "total_steps": (lambda v: v is None or _is_int(v), "None or an integer >= 0"),
    "num_warmup_steps": (lambda v: v is None or _is_int(v), "None or an integer >= 0"),
    "num_training_steps": (lambda v: v is None or _is_int(v), "None or an integer >= 0"),
    "min_lr": (lambda v: v is None or _is_real(v), "None or a finite number"),
    "min_lr_ratio": (lambda v: v is None or _is_real(v), "None or a finite number"),
    "lr_init": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "t_in_epochs": (lambda v: isinstance(v, bool), "True or False"),
}


class HFScheduleLR(ScheduleLR):
    """Hugging Face's schedule ``name`` (``optimizer.hf_schedules``): what transformers'
    ``get_scheduler(name, optimizer, num_warmup_steps, num_training_steps,
    scheduler_specific_kwargs)`` gives, as the same adapter as :class:`ScheduleLR`. Each
    group's rate is its initial lr times transformers' multiplier, from step 0 (set on
    construction) on: ``step()`` advances one step, as ``LambdaLR``'s does."""

    like = "transformers"
    _state_keys = ("schedule", "num_warmup_steps", "num_training_steps", "options", "lr_init")
    _optional_state_keys = ()

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
    _optional_state_keys = ()

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
