"""GreedyLR (Subramanian et al., "GreedyLR: A Novel Adaptive Learning Rate Scheduler",
arXiv:2512.14527): transformers' ``greedy`` schedule, which follows a metric rather than
the step count.

It watches a metric (``step(metric)``, e.g. the loss): after more than ``patience``
steps in a row that improve on the best value so far (by ``threshold``, absolute or
relative) it *raises* every group's lr by ``1 / factor`` (up to ``max_lr``); after more
than ``patience`` steps in a row that do not, it lowers it by ``factor`` (down to
``min_lr``); changes smaller than ``eps`` are skipped. After a raise it waits ``warmup``
steps, after a lowering ``cooldown`` steps, before counting again. If every group stays
at its ``min_lr`` for ``reset_start`` lowerings in a row, it starts over from the initial
rates. ``smooth=True`` watches the mean of the last ``window_size`` values instead.
Checked step by step against transformers' own ``GreedyLR`` (tests/test_schedule_conventions.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["GreedyLR"]


class GreedyLR:
    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "min", factor: float = 0.95, patience: int = 10,
                 threshold: float = 1e-6, threshold_mode: str = "abs", cooldown: int = 0, warmup: int = 0,
                 min_lr: float | list[float] = 1e-3, max_lr: float | list[float] = 1.0, eps: float = 1e-8,
                 verbose: bool = False, smooth: bool = False, window_size: int = 50, reset_start: int = 500) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"Invalid factor: {factor} (must be in (0, 1): the lr is divided by it to raise it)")
        if mode not in ("min", "max"):
            raise ValueError(f"Invalid mode: {mode!r} (must be 'min' or 'max')")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"Invalid threshold_mode: {threshold_mode!r} (must be 'rel' or 'abs')")
        n = len(optimizer.param_groups)
        self.optimizer = optimizer
        self.min_lrs = self._per_group("min_lr", min_lr, n)
        self.max_lrs = self._per_group("max_lr", max_lr, n)
        self.mode, self.factor, self.patience, self.threshold = mode, factor, patience, threshold
        self.threshold_mode, self.cooldown, self.warmup, self.eps = threshold_mode, cooldown, warmup, eps
        self.verbose, self.smooth, self.window_size = verbose, smooth, window_size
        self.reset_start = self.reset_start_original = reset_start
        self._init_lrs = [group["lr"] for group in optimizer.param_groups]
        self._last_lr = list(self._init_lrs)
        self.last_epoch = 0
        self._restart()

    @staticmethod
    def _per_group(name: str, value: float | list[float], n: int) -> list[float]:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"Invalid {name}: {len(value)} values for {n} parameter groups")
            return list(value)
        return [value] * n

    def _restart(self) -> None:
        """The counters and the best value as at the start (the rates are reset by the caller)."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = self.num_good_epochs = 0
        self.cooldown_counter = self.warmup_counter = 0
        self.reset_start = self.reset_start_original
        # the smoothing window: its values and their running sum (kept as a running sum)
        self._window: list[float] = []
        self._window_sum = 0.0

    def _smoothed(self, value: float) -> float:
        self._window.append(value)
        self._window_sum += value
        if len(self._window) > self.window_size:
            self._window_sum -= self._window.pop(0)
        return self._window_sum / len(self._window)

    def _improves(self, current: float) -> bool:
        sign = 1.0 if self.mode == "min" else -1.0  # min: lower is better
        if self.threshold_mode == "rel":
            return sign * current < sign * self.best * (1.0 - sign * self.threshold)
        return sign * current < sign * self.best - self.threshold

    def step(self, metrics: float, epoch: int | None = None) -> None:
        current = float(metrics)
        if self.smooth:
            current = self._smoothed(current)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if self.cooldown_counter > 0 or self.warmup_counter > 0:  # waiting after a change
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
            else:
                self.warmup_counter -= 1
            self.num_bad_epochs = self.num_good_epochs = 0
        else:
            if self._improves(current):
                self.best = current
                self.num_bad_epochs, self.num_good_epochs = 0, self.num_good_epochs + 1
            else:
                self.num_bad_epochs, self.num_good_epochs = self.num_bad_epochs + 1, 0
            if self.num_good_epochs > self.patience:
                self._raise()
                self.warmup_counter, self.num_good_epochs = self.warmup, 0
            elif self.num_bad_epochs > self.patience:
                self._lower()
                self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _raise(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            old = float(group["lr"])
            new = min(old / self.factor, self.max_lrs[i])
            if new - old > self.eps:
                group["lr"] = new
                self._say(f"raising the learning rate of group {i} to {new:.4e}")
        self.reset_start = self.reset_start_original

    def _lower(self) -> None:
        at_floor = True
        for i, group in enumerate(self.optimizer.param_groups):
            old = float(group["lr"])
            new = max(old * self.factor, self.min_lrs[i])
            if old - new > self.eps:
                group["lr"] = new
                self._say(f"lowering the learning rate of group {i} to {new:.4e}")
            at_floor = at_floor and not group["lr"] > self.min_lrs[i]
        if at_floor:
            self.reset_start -= 1
            if self.reset_start <= 0:
                for group, lr in zip(self.optimizer.param_groups, self._init_lrs):
                    group["lr"] = lr
                self._restart()
                self._say("back to the initial learning rates")

    def _say(self, what: str) -> None:
        if self.verbose:
            print(f"Epoch {self.last_epoch}: {what}.")

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists only (loads with ``weights_only=True``)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave, and set every group's lr to its saved one. Every key is
        checked first: a bad state_dict raises a one-line ``ValueError`` naming its key and leaves
        the scheduler and the optimizer as they were."""
        values = self._checked_state(state_dict)
        self.__dict__.update(values)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def _checked_state(self, state_dict: Any) -> dict[str, Any]:
        where = "Invalid state_dict for GreedyLR"
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        values = {k: v for k, v in state_dict.items() if k != "optimizer"}
        expected = set(self.state_dict())
        missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
        if missing or unknown:
            raise ValueError(f"{where}: " + "; ".join(
                [f"missing {missing}"] * bool(missing) + [f"unknown keys {unknown}"] * bool(unknown)))
        n = len(self.optimizer.param_groups)
        for key, value in values.items():
            ok, rule = _STATE_RULES.get(key, (_number, "a number"))
            if key in _PER_GROUP:
                ok = lambda v: isinstance(v, (list, tuple)) and len(v) == n and all(map(_finite, v))  # noqa: E731
                rule = f"a list of {n} finite numbers, one per parameter group"
            if not ok(value):
                raise ValueError(f"{where}: {key!r} is {value!r} (must be {rule})")
        if len(values["_window"]) > values["window_size"]:
            raise ValueError(f"{where}: '_window' holds {len(values['_window'])} values, more than its window_size "
                             f"{values['window_size']}")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_PER_GROUP = ("min_lrs", "max_lrs", "_init_lrs", "_last_lr")  # one value per parameter group
# what each key of GreedyLR.state_dict() must be (the per-group lists: _PER_GROUP)
_STATE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mode": (lambda v: v in ("min", "max"), "'min' or 'max'"),
    "threshold_mode": (lambda v: v in ("rel", "abs"), "'rel' or 'abs'"),
    "factor": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "best": (lambda v: _number(v) and not math.isnan(v), "a number, or +-inf before the first step"),
    "threshold": (_finite, "a finite number"),
    "eps": (_finite, "a finite number"),
    "_window_sum": (_finite, "a finite number"),
    "_window": (lambda v: isinstance(v, (list, tuple)) and all(map(_finite, v)), "a list of finite numbers"),
    "verbose": (lambda v: isinstance(v, bool), "True or False"),
    "smooth": (lambda v: isinstance(v, bool), "True or False"),
    "window_size": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "last_epoch": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    **{k: (_count, "an integer >= 0") for k in (
        "patience", "cooldown", "warmup", "reset_start", "reset_start_original", "num_bad_epochs",
        "num_good_epochs", "cooldown_counter", "warmup_counter")},
}
