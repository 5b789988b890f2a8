"""What every optimizer of this package shares: the two-phase step, checkpoints,
and what ``torch.compile`` sees (argument checks are in ``_checks.py``, tensor and
dtype helpers in ``_tensors.py``, the backends in ``_dispatch.py``). The
``torch.optim.Optimizer`` contract is one class, so it is one file.

An algorithm file (``adamw.py``, ``lion.py``) only says which hyper-parameters
it has, which state it keeps and which backends update it; the contract that
``torch.optim`` users rely on lives here once.

Note [two-phase step]
~~~~~~~~~~~~~~~~~~~~~
A step that raises must leave parameters, gradients and state exactly as they
were. So ``step()`` first *checks and plans* every group without changing
anything (``_prepare``): hyper-parameters, including that the numbers the update
multiplies by fit its float precision; parameters (dtype, and that none holds two
elements in one place, as an expanded tensor does: torch refuses to write those);
gradients (layout, shape, dtype, device); existing state (keys, shape, dtype, device,
and the same for its memory); stochastic rounding outside a CUDA graph capture (Note
[stochastic rounding]); which backend takes which tensor, which compiles the C loop or
imports Triton if needed (Note [backends]). Only then does it create missing state
and update. Every error we can foresee is raised in the first phase, whatever the
backend. What no check can foresee is not covered: running out of memory midway, an
interrupt (Ctrl-C) midway, an error that a GPU kernel reports after it ran.

Existing state is checked when it is new to the step (loaded, or replaced by assigning
``opt.state[p]`` or one of its tensors; ``_checked_before``), not every step; the
values of a checkpoint (a step count of -1, a negative ``exp_avg_sq``) once, by
``load_state_dict`` (``_check_saved_state``), never by a step.

Note [GradScaler]
~~~~~~~~~~~~~~~~~
Our optimizers set ``_step_supports_amp_scaling``: ``torch.amp.GradScaler.step``
then hands them ``grad_scale`` (divide the gradients by it) and ``found_inf``
(skip the step, changing nothing) as attributes instead of unscaling and
checking on the host itself. The fused GPU kernels use both on the device,
without a sync; the other backends unscale into temporaries and read
``found_inf`` (one sync, as GradScaler's own path would).

Note [torch.compile]
~~~~~~~~~~~~~~~~~~~~
``torch.compile(opt.step)``, or a compiled training step that calls it, traces
``_compiled_step``. It is shaped as torch.optim's steps are, so Dynamo treats it
as it treats theirs: ``_init_group`` (check, gather, create state) runs once, in
Python, when Dynamo traces, and Dynamo guards on what it read instead of tracing
it; the foreach and reference updates are traced into the graph, with the
learning rate as an input (no recompilation when a scheduler changes it). A step
with a group that is fused (``fused=True``, or the default, which is fused on CPU
and CUDA) runs outside the graph, whole, exactly as in eager mode: one graph
break, as torch keeps its own fused kernels out of tracing. In a traced step the
checks of Note [two-phase step] run when Dynamo traces, not at every call.

Note [several algorithms]
~~~~~~~~~~~~~~~~~~~~~~~~~
An optimizer may update its groups with different algorithms (Muon: its matrices with
Muon, the rest with AdamW), keeping one ``state``, one ``param_groups`` and so one
``state_dict`` and one scheduler. What an algorithm says (its state and counter keys, its
backends, its checks, new state, the backends' keyword arguments and the numbers to check)
is an :class:`Algorithm`; the optimizer asks ``_algorithm(group)`` for the one of each
group, and ``_group_defaults(group)`` for the options a group's missing keys take. A
one-algorithm optimizer (AdamW, Lion) is its own algorithm and its ``defaults``; each group
of a several-algorithm one holds its own algorithm's options only. Everything else (the
two-phase step across all groups, checkpoints checked group by group, ``torch.compile``)
is the same code for both.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _dispatch, _rounding
from ._checks import check_fits, count_error, lowest
from ._tensors import LOW_PRECISION, Meta, first_sharing_memory, is_dtensor, local, state_dtype, step_device

__all__ = ["Algorithm", "Optimizer"]


_GRAD, _LAYOUT, _SHAPE = operator.attrgetter("grad"), operator.attrgetter("layout"), operator.attrgetter("shape")
_DTYPE, _DEVICE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("is_cpu")


# group options that say how states are stored: load_state_dict keeps the loading optimizer's
# and converts the saved states (Note [8-bit states])
_PRECISION_KEYS = ("state_dtype", "min_8bit_size")


@dataclass
class Part:
    """Tensors of a group that one set of backends updates: all of them, or, with 8-bit
    states, the quantised ones and the others (Note [8-bit states])."""

    backends: _dispatch.Backends
    lists: list[list[Any]]  # params, grads, one list per state key, one per counter key
    routes: dict[str, list[int]]
    hyper: dict[str, Any]


@dataclass
class Prepared:
    """A group checked and planned for this step (Note [two-phase step])."""

    group: dict[str, Any]
    parts: list[Part]
    new: dict[Tensor, dict[str, Any]] = field(default_factory=dict)  # state to create

    @property
    def lists(self) -> list[list[Any]]:
        return self.parts[0].lists


class Algorithm:
    """What one algorithm says (Note [several algorithms]).

    ``state_keys`` (the state shaped like the parameter, in the order of the backends'
    arguments), ``counter_keys`` (scalar state such as AdamW's ``step``), ``backends`` and
    ``backends_8bit`` (Note [backends]), ``checkpoint_keys``, ``nonnegative_keys``, and the methods
    ``_check_group(group)``, ``_new_state(param, group)``, ``_hyper(group)`` (the backends'
    keyword arguments) and ``_scalars(group)`` (the numbers the update multiplies by, for
    ``check_fits``).
    """

    state_keys: tuple[str, ...] = ()
    counter_keys: tuple[str, ...] = ()
    backends: _dispatch.Backends
    backends_8bit: _dispatch.Backends
    # group keys a checkpoint of this algorithm always has; others may be missing (then the
    # defaults fill them), so a torch.optim.AdamW checkpoint loads into our AdamW
    checkpoint_keys: tuple[str, ...] = ("lr", "betas", "weight_decay")
    # state keys that can never hold a value below 0 (means of squares): a checkpoint is refused if
    # one does (``_check_saved_state``)
    nonnegative_keys: tuple[str, ...] = ()

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any]) -> dict[str, float | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _8bit_indices(self, params: list[Tensor], group: dict[str, Any]) -> list[int]:
        """Which of a step's parameters keep 8-bit states (Note [8-bit states])."""
        if group.get("state_dtype") != torch.uint8:
            return []
        size = group.get("min_8bit_size", _8bit.MIN_8BIT_SIZE)
        return [i for i, p in enumerate(params) if _8bit.quantized(p, size)]

    def _zero_states(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Zero states for ``state_keys``: 8-bit codes and their scales where Note [8-bit states]
        says, else tensors in ``state_dtype`` (Note [state precision])."""
        if self._8bit_indices([param], group):
            codes = {key: torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)
                     for key in self.state_keys}
            return {**codes, **{f"{key}_scale": _8bit.new_scales(param) for key in self.state_keys}}
        dtype = state_dtype(param, group.get("state_dtype"))
        return {key: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                for key in self.state_keys}

    def _state_keys(self, eight: bool) -> tuple[str, ...]:
        """The state keys in the backends' order; with 8-bit states, each state's scales follow."""
        scales = tuple(f"{key}_scale" for key in self.state_keys) if eight else ()
        return (*self.state_keys, *scales, *self.counter_keys)


class Optimizer(Algorithm, torch.optim.Optimizer):
    """Base of this package's optimizers (a real ``torch.optim.Optimizer``).

    A subclass with one algorithm is that :class:`Algorithm`: it sets its class attributes
    and implements its methods. One with several (Note [several algorithms]) also overrides
    ``_algorithm(group)`` and ``_group_defaults(group)``.
    """

    _step_supports_amp_scaling = True  # Note [GradScaler]

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._check_defaults(defaults)  # hyper-parameters first, as torch.optim checks them
        if isinstance(params, Tensor):
            raise TypeError(
                "Invalid params: params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got a single Tensor of shape {tuple(params.shape)}; pass [tensor] or model.parameters()"
            )
        if not isinstance(params, Iterable):
            raise TypeError("Invalid params: params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {params!r}")
        params = list(params)
        if len(params) == 0:
            raise ValueError("Invalid params: the parameter list is empty (did the model define any parameters?)")
        super().__init__(params, defaults)

    # ----- which algorithm, Note [several algorithms] ------------------------------

    def _algorithm(self, group: dict[str, Any]) -> Algorithm:
        """The algorithm that updates ``group``: this optimizer's own."""
        return self

    def _group_defaults(self, group: dict[str, Any]) -> dict[str, Any]:
        """The options that ``group``'s missing keys take: this optimizer's defaults."""
        return self.defaults

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """The constructor's hyper-parameters, checked before its parameters."""
        self._check_group(dict(defaults))

    # ----- parameter groups ---------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param_group: expected a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("Invalid params: a set has no order; pass a list of Tensors")
        elif isinstance(params, Iterable):
            params = list(params)
        else:
            raise TypeError(f"Invalid params: expected Tensors in param_group['params'], got {params!r}")
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        seen = {id(p): f"parameter group {gi}" for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for i, p in enumerate(tensors):
            if isinstance(p, Tensor) and id(p) in seen:
                where = seen[id(p)]
                raise ValueError(
                    f"Invalid params: parameter {i} of group {len(self.param_groups)} "
                    f"(shape {tuple(p.shape)}) already appears in {where}; a parameter may appear once only "
                    + ("(it would be updated twice)" if where == "the same group"
                       else "(some parameters appear in more than one parameter group)")
                )
            seen[id(p)] = "the same group"
        filled = {**self._group_defaults(param_group), **param_group, "params": tensors}
        self._algorithm(filled)._check_group(filled)
        super().add_param_group({**filled, "params": params})
        group = self.param_groups[-1]
        for key in set(group) - set(filled) - {"param_names"}:  # another algorithm's options, added by torch
            del group[key]

    # ----- the step, Note [two-phase step] ------------------------------------

    def _prepare(self, gi: int, group: dict[str, Any]) -> Prepared:
        """Phase 1 for one group: check everything, plan the update; changes nothing."""
        alg = self._algorithm(group)
        alg._check_group(group)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            empty = [[] for _ in range(2 + len(alg.state_keys) + len(alg.counter_keys))]
            return Prepared(group, [Part(alg.backends, empty, {}, {})])
        grads = list(map(_GRAD, params))
        # the common case checked with C-level maps (this runs every step), the culprit found after
        meta = Meta(params)
        bad = meta.bad_dtype()
        if bad is not None:
            raise RuntimeError(
                f"{self._where(gi, group, params[bad])} is {params[bad].dtype}: "
                f"{type(self).__name__} updates float16, bfloat16, float32, float64 and complex parameters"
            )
        if not (set(map(_LAYOUT, grads)) <= {torch.strided} and meta.same(grads)):
            for p, g in zip(params, grads):
                if g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    self._bad_tensor(gi, group, p, "gradient", g, p.dtype, p.device)
        self._check_own_memory(gi, group, params, params)  # (gradients are only read: they may share memory)
        new: dict[Tensor, dict[str, Any]] = {}
        states = []
        for p in params:
            state = self.state.get(p)
            if not state:
                state = new[p] = alg._new_state(p, group)
            states.append(state)
        check_fits(alg._scalars(group), params)
        hyper = alg._hyper(group)
        if group.get("stochastic_rounding"):  # Note [stochastic rounding]: each tensor's own stream
            first = sum(len(g["params"]) for g in self.param_groups[:gi])
            positions = [first + i for i, p in enumerate(group["params"]) if p.grad is not None]
            hyper["rounding_seeds"] = _rounding.rounding_seeds(group.get("seed", 0), group.get("rounding_step", 0),
                                                            positions)
        eight = alg._8bit_indices(params, group)
        if not eight:
            parts = [self._part(gi, group, params, grads, states, meta, hyper, new, eight=False)]
        else:  # Note [8-bit states]: the quantised tensors, and the others
            split = [[i for i in range(len(params)) if i not in eight], eight]
            parts = []
            for idx, is_8bit in zip(split, (False, True)):
                if idx:
                    sub = [params[i] for i in idx]
                    sub_hyper = dict(hyper)
                    if "rounding_seeds" in hyper:
                        sub_hyper["rounding_seeds"] = [hyper["rounding_seeds"][i] for i in idx]
                    parts.append(self._part(gi, group, sub, [grads[i] for i in idx], [states[i] for i in idx],
                                            Meta(sub), sub_hyper, new, eight=is_8bit))
        return Prepared(group, parts, new)

    def _part(self, gi: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
              states: list[dict[str, Any]], meta: Meta, hyper: dict[str, Any], new: dict[Tensor, Any], *,
              eight: bool) -> Part:
        """Gather, check and route the tensors that one set of backends updates."""
        alg = self._algorithm(group)
        lists = self._gather(gi, group, params, grads, states, alg._state_keys(eight))
        check = ((lambda: self._check_8bit_states(gi, group, params, lists)) if eight
                 else (lambda: self._check_states(gi, group, params, lists, meta)))
        self._check_once((gi, eight), params, lists, meta, new, check)
        backends = alg.backends_8bit if eight else alg.backends
        routes = _dispatch.route(backends, lists, hyper, foreach=group["foreach"], fused=group["fused"])
        return Part(backends, lists, routes, hyper)

    def _gather(self, gi: int, group: dict[str, Any], params: list[Tensor], grads: list[Any],
                states: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list[Any]]:
        """[params, grads, and one list per state key in ``keys``], from each parameter's state."""
        lists: list[list[Any]] = [params, grads]
        for key in keys:
            try:
                lists.append([s[key] for s in states])
            except KeyError:
                p, state = next((p, s) for p, s in zip(params, states) if key not in s)
                raise RuntimeError(f"{self._where(gi, group, p)} has state {sorted(state)} without {key!r}: was it "
                                   "changed by hand, or loaded from another optimizer (load_state_dict converts "
                                   "between state precisions)?") from None
        return lists

    def _check_once(self, check_key: Any, params: list[Tensor], lists: list[list[Any]], meta: Meta,
                    new: dict[Tensor, Any], check: Callable[[], None]) -> None:
        """Run ``check`` on states that are not all new, unless :meth:`_checked_before` says these
        were checked at the last step under ``check_key``."""
        if any(p not in new for p in params) and not self._checked_before(check_key, lists, meta):
            check()
            self._checked[check_key] = (meta.shapes, meta.dtypes, meta.device_indices(), lists[:1] + lists[2:])

    def _check_8bit_states(self, gi: int, group: dict[str, Any], params: list[Tensor],
                           lists: list[list[Any]]) -> None:
        """8-bit states must be what this optimizer would create: uint8 codes shaped like the
        parameter, float32 scales of ``_8bit.scale_shape``, on the parameter's device."""
        alg = self._algorithm(group)
        n = len(alg.state_keys)
        keys = alg._state_keys(True)
        for j, key in enumerate(keys[:2 * n]):
            for p, v in zip(params, lists[2 + j]):
                shape, dtype = (p.shape, torch.uint8) if j < n else (_8bit.scale_shape(p.shape), torch.float32)
                if not isinstance(v, Tensor):
                    raise RuntimeError(f"{self._where(gi, group, p)} has state[{key!r}] = {v!r}, not a tensor")
                if tuple(v.shape) != tuple(shape) or v.dtype != dtype or v.device != p.device:
                    self._bad_tensor(gi, group, p, f"state[{key!r}]", v, dtype, p.device, shape)
            self._check_own_memory(gi, group, params, lists[2 + j], key)
        self._check_counters(gi, group, params, lists[2 + 2 * n:], Meta(params))

    def _checked_before(self, gi: Any, lists: list[list[Any]], meta: Meta) -> bool:
        """The same parameters (same shapes, dtypes, devices) with the same state tensors as
        at this group's last check: nothing to check again. State replaced by any of torch's
        ways (``load_state_dict``, assigning ``opt.state[p]`` or one of its entries) is new
        objects, so it is checked; a tensor changed in place (``.data =``, ``resize_``) is not."""
        checked = getattr(self, "_checked", None)
        if checked is None:
            self._checked: dict[tuple[int, bool], tuple[Any, ...]] = {}
            return False
        last = checked.get(gi)
        if last is None or last[0] != meta.shapes or last[1] != meta.dtypes or last[2] != meta.device_indices():
            return False
        return all(len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(last[3], lists[:1] + lists[2:]))

    def _check_states(self, gi: int, group: dict[str, Any], params: list[Tensor], lists: list[list[Any]],
                      meta: Meta) -> None:
        """Existing state must be what this optimizer would create (a user may have replaced it)."""
        requested = group.get("state_dtype")
        if requested == torch.uint8:  # the tensors Note [8-bit states] leaves in float
            requested = None
        expected_of = {d: requested if requested is not None and not d.is_complex else LOW_PRECISION.get(d, d)
                       for d in set(meta.dtypes)}
        expected = list(map(expected_of.__getitem__, meta.dtypes))
        state_keys = self._algorithm(group).state_keys
        n = len(state_keys)
        for key, values in zip(state_keys, lists[2:2 + n]):
            try:
                ok = meta.same(values, dtypes=expected)
            except AttributeError:  # not a tensor
                ok = False
            if not ok:
                for p, v, dtype in zip(params, values, expected):
                    if not isinstance(v, Tensor):
                        raise RuntimeError(f"{self._where(gi, group, p)} has state[{key!r}] = {v!r}, not a tensor")
                    if v.shape != p.shape or v.dtype != dtype or v.device != p.device:
                        self._bad_tensor(gi, group, p, f"state[{key!r}]", v, dtype, p.device)
            self._check_own_memory(gi, group, params, values, key)
        self._check_counters(gi, group, params, lists[2 + n:], meta)

    def _check_counters(self, gi: int, group: dict[str, Any], params: list[Tensor], counters: list[list[Any]],
                        meta: Meta) -> None:
        cpu = torch.device("cpu")
        for key, values in zip(self._algorithm(group).counter_keys, counters):
            try:  # one-element float tensors, on the CPU or on the parameter's device
                ok = (set(map(Tensor.numel, values)) == {1} and all(map(Tensor.is_floating_point, values))
                      and (all(map(_IS_CPU, values)) or meta.same_devices(values)))
            except TypeError:  # not a tensor
                ok = False
            if not ok:
                for p, v in zip(params, values):
                    if not (isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point()
                            and v.device in (cpu, p.device)):
                        raise RuntimeError(f"{self._where(gi, group, p)} has state[{key!r}] = {v!r}; expected a "
                                           f"one-element float tensor on the CPU or on {p.device}")

    def _check_own_memory(self, gi: int, group: dict[str, Any], params: list[Tensor], tensors: list[Any],
                          key: str | None = None) -> None:
        """The tensors a step writes in place (parameters; their states, ``key``) must not hold two
        elements in one place (an expanded tensor): torch refuses to write one, and would
        raise midway through the step, after other tensors moved (Note [two-phase step])."""
        bad = first_sharing_memory(tensors)
        if bad is None:
            return
        where, strides = self._where(gi, group, params[bad]), tuple(local(tensors[bad]).stride())
        if key is None:
            raise RuntimeError(f"{where} shares memory between its elements (strides {strides}: an expanded "
                               "tensor?), and a step writes each element in place: give it memory of its own, "
                               "e.g. p.data = p.data.clone()")
        raise RuntimeError(f"{where} has a state[{key!r}] whose elements share memory (strides {strides}), and a "
                           "step writes each element in place: replace it with a tensor of its own")

    def _where(self, gi: int, group: dict[str, Any], p: Tensor) -> str:
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        return f"{type(self).__name__}: parameter {i} of group {gi} (shape {tuple(p.shape)})"

    def _bad_tensor(self, gi: int, group: dict[str, Any], p: Tensor, what: str, t: Tensor, dtype: torch.dtype,
                    device: torch.device, shape: Any = None) -> None:
        where = self._where(gi, group, p)
        if t.layout != torch.strided:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients ({where.split(': ', 1)[1]} has a "
                f"{t.layout} {what}); use optimizer.SparseAdamW (or torch.optim.SparseAdam) for sparse embeddings, "
                "or nn.Embedding(sparse=False)"
            )
        raise RuntimeError(f"{where} has a {what} of shape {tuple(t.shape)}, {t.dtype} on {t.device}; "
                           f"expected shape {tuple(p.shape if shape is None else shape)}, {dtype} on {device}")

    def _amp(self) -> dict[str, Tensor | None]:
        """``grad_scale`` and ``found_inf``, set by torch.amp.GradScaler.step for the duration of
        this call (Note [GradScaler]), checked: one-element float tensors, or None."""
        amp = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}
        for name, value in amp.items():
            if value is not None and not (isinstance(value, Tensor) and value.numel() == 1
                                          and value.is_floating_point()):
                raise ValueError(f"Invalid {name}: {value!r} (GradScaler sets a one-element float tensor)")
        return amp

    def _run(self, group: dict[str, Any], part: Part, amp: dict[str, Tensor | None]) -> None:
        _dispatch.step(part.backends, part.lists, part.hyper, foreach=group["foreach"], fused=group["fused"],
                       routes=part.routes, **amp)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling():
            self._step()
        elif (any(map(self._outside_graph, self.param_groups))
              or getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None):
            # fused, or the default (fused on CPU and CUDA), or 8-bit states, or GradScaler's flag to
            # read: Note [torch.compile]
            self._step_outside_graph()
        else:
            self._compiled_step()
        return loss

    def _outside_graph(self, group: dict[str, Any]) -> bool:
        """Whether a compiled step runs this group outside the graph (Note [torch.compile]): its fused
        kernels (``fused=True``, or the default where the algorithm has them), stochastic rounding
        or 8-bit states."""
        fused = group["fused"] or (group["fused"] is None and group["foreach"] is None)
        return ((fused and self._algorithm(group).backends.fused_kernels) or bool(group.get("stochastic_rounding"))
                or group.get("state_dtype") == torch.uint8)

    def _step(self) -> None:
        """The step in eager mode, Note [two-phase step]."""
        amp = self._amp()  # phase 1
        prepared = [self._prepare(gi, group) for gi, group in enumerate(self.param_groups)]
        for prep in prepared:  # phase 2
            self.state.update(prep.new)
            for part in prep.parts:
                if part.lists[0]:
                    self._run(prep.group, part, amp)
            # Note [stochastic rounding]: the group's count of stochastic steps
            if prep.group.get("stochastic_rounding") and any(part.lists[0] for part in prep.parts):
                prep.group["rounding_step"] = prep.group.get("rounding_step", 0) + 1

    @torch._disable_dynamo  # outside the graph, as torch keeps its fused steps (imports Dynamo lazily, on first call)
    def _step_outside_graph(self) -> None:
        self._step()

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], *states: list[Any]) -> None:
        """Gather a group's parameters with gradients, their gradients and state (created where
        missing) into the given empty lists: torch.optim's hook for Note [torch.compile]."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        if gi == 0:  # check the other groups before the first one creates state (Note [two-phase step])
            for i, other in enumerate(self.param_groups[1:], 1):
                self._prepare(i, other)
        prep = self._prepare(gi, group)
        self.state.update(prep.new)
        for out, values in zip((params, grads, *states), prep.lists):
            out.extend(values)

    def _compiled_step(self) -> None:
        """The step as ``torch.compile`` traces it (Note [torch.compile])."""
        for group in self.param_groups:
            alg = self._algorithm(group)
            lists: list[list[Any]] = [[] for _ in range(2 + len(alg.state_keys) + len(alg.counter_keys))]
            self._init_group(group, *lists)
            if lists[0]:
                part = Part(alg.backends, lists, None, alg._hyper(group))
                self._run(group, part, {"grad_scale": None, "found_inf": None})

    # ----- checkpoints ---------------------------------------------------------

    def _check_saved_state(self, p: Tensor, state: dict[str, Any], where: str, alg: Algorithm | None = None) -> None:
        """A saved state fits ``p`` as ``alg`` (by default this optimizer's algorithm) keeps it: its
        keys, shapes and kinds, and values that a run can reach (a step count is a whole number
        >= 0; a second moment is >= 0, +inf and NaN included, as float32 AdamW holds them after an
        overflow; the values of a parameter are real, or complex for a complex one). Read once, at
        load (one reduction per tensor), so that the step never needs to."""
        alg = self if alg is None else alg
        if not state:  # none yet: torch.optim's state (a defaultdict) makes an empty one where read
            return
        keys = set(state)
        expected = {*alg.state_keys, *alg.counter_keys}
        if keys != expected and keys != set(alg._state_keys(True)):  # float states, or 8-bit ones
            raise ValueError(
                f"Invalid state for {where}: {_name(alg)} keeps {sorted(expected)}, "
                f"found {sorted(map(str, keys))} (is it another optimizer's checkpoint?)"
            )
        eight = keys != expected
        if eight:
            if p.is_complex():
                raise ValueError(f"Invalid 8-bit state for {where}: 8-bit states are kept for real parameters, this "
                                 f"one is {p.dtype}")
            for key in alg.state_keys:
                codes, scale = state[key], state[f"{key}_scale"]
                if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8 and isinstance(scale, Tensor)
                        and scale.is_floating_point() and tuple(scale.shape) == _8bit.scale_shape(p.shape)):
                    raise ValueError(f"Invalid 8-bit state[{key!r}] for {where}: uint8 codes of shape "
                                     f"{tuple(p.shape)} and float scales of shape {_8bit.scale_shape(p.shape)} "
                                     "expected")
                _check_readable(p, scale, f"state[{key + '_scale'!r}] for {where}")
                # a negative scale marks a block holding an infinity or a NaN (its largest finite
                # magnitude, negated), and scales written before that could be +inf or NaN: -inf never
                if lowest(scale) == -math.inf:
                    raise ValueError(f"Invalid state[{key + '_scale'!r}] for {where}: a scale of -inf (a block's "
                                     "scale is its largest finite magnitude, negated where the block holds an "
                                     "infinity or a NaN)")
        for key in alg.counter_keys:
            why = count_error(state[key])
            if why is not None:
                raise ValueError(f"Invalid state[{key!r}] for {where}: {why}")
        for key in alg.state_keys:
            v = state[key]
            if not isinstance(v, Tensor) or v.shape != p.shape:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"Invalid state[{key!r}] for {where}: shape {shape}, expected {tuple(p.shape)}")
            _check_readable(p, v, f"state[{key!r}] for {where}")
            if eight:
                continue
            if not (v.is_floating_point() or v.is_complex()) or v.is_complex() != p.is_complex():
                kind = "complex" if p.is_complex() else "real floating point"
                raise ValueError(f"Invalid state[{key!r}] for {where}: {v.dtype} values for a {p.dtype} parameter "
                                 f"(expected {kind} ones)")
            if key in alg.nonnegative_keys and lowest(v) < 0:
                raise ValueError(f"Invalid state[{key!r}] for {where}: it holds negative values (a mean of squares, "
                                 "never below 0: is the checkpoint damaged?)")

    def _check_containers(self, state_dict: Any) -> None:
        """The containers of a checkpoint are torch.optim's: ``param_groups`` a list of dicts, each
        with a list of parameter indices, no index twice; ``state`` a dict of index -> a dict."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"Invalid state_dict for {name}: expected a dict with 'state' and 'param_groups'")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"Invalid state_dict for {name}: 'param_groups' is a {type(groups).__name__}, expected "
                             "a list of dicts (one per parameter group)")
        if not isinstance(state, dict):
            raise ValueError(f"Invalid state_dict for {name}: 'state' is a {type(state).__name__}, expected a dict "
                             "of parameter index -> that parameter's state (a dict)")
        seen: set[Any] = set()
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
                got = type(group.get("params")).__name__ if isinstance(group, dict) else type(group).__name__
                raise ValueError(f"Invalid state_dict for {name}: param_groups[{gi}] is not a dict with a list "
                                 f"'params' ({got})")
            for index in group["params"]:
                if not isinstance(index, Hashable) or index in seen:
                    why = "appears twice" if isinstance(index, Hashable) else "is not a parameter index"
                    raise ValueError(f"Invalid state_dict for {name}: param_groups[{gi}] lists parameter {index!r}, "
                                     f"which {why} (a parameter belongs to one group, once)")
                seen.add(index)
                if not isinstance(state.get(index, {}), dict):
                    raise ValueError(f"Invalid state_dict for {name}: state[{index!r}] is a "
                                     f"{type(state[index]).__name__}, expected a dict (that parameter's state)")

    def _check_checkpoint(self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]) -> dict[Any, Tensor]:
        """Check that a checkpoint fits this optimizer; returns its parameter indices -> our parameters."""
        name = type(self).__name__
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict for {name}: it has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)} (is it another optimizer's checkpoint, or another model's?)"
            )
        index_to_param: dict[Any, Tensor] = {}
        algorithm_of: dict[Any, Algorithm] = {}
        place_of: dict[Any, str] = {}  # (for error messages)
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay"):
                raise ValueError(
                    f"Invalid state_dict for {name}: param_groups[{gi}] has decoupled_weight_decay=False "
                    "(torch.optim.Adam's L2 penalty, not decoupled weight decay): it is another optimizer's checkpoint"
                )
            alg = self._algorithm(group)
            saved_alg = self._algorithm({**self._group_defaults(saved), **saved})
            if saved_alg is not alg:
                raise ValueError(
                    f"Invalid state_dict for {name}: param_groups[{gi}] is updated by {_name(saved_alg)}, this "
                    f"optimizer's group {gi} by {_name(alg)}"
                )
            missing = sorted(k for k in alg.checkpoint_keys if k not in saved)
            if missing:
                raise ValueError(
                    f"Invalid state_dict for {name}: param_groups[{gi}] lacks {missing} "
                    "(is it another optimizer's checkpoint?)"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Invalid state_dict for {name}: param_groups[{gi}] has {len(saved['params'])} "
                    f"parameters, this optimizer's group {gi} has {len(group['params'])}"
                )
            alg._check_group({**self._group_defaults(saved), **saved, "params": group["params"]})
            index_to_param.update(zip(saved["params"], group["params"]))
            algorithm_of.update(dict.fromkeys(saved["params"], alg))
            place_of.update((index, f"parameter {i} of group {gi}") for i, index in enumerate(saved["params"]))
        for index, state in saved_state.items():
            if index in index_to_param:
                p = index_to_param[index]
                where = f"saved parameter {index!r} ({place_of[index]}, shape {tuple(p.shape)})"
                self._check_saved_state(p, state, where, algorithm_of[index])
        return index_to_param

    def _restore_state(self, p: Tensor, saved: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """A parameter's saved state as this optimizer keeps it: counters as float32 scalars
        where ``step_device`` says, tensors in ``state_dtype`` (Note [state precision]) and in
        the parameter's layout (so that the fused kernels take them), always copies."""
        state: dict[str, Any] = {}
        alg = self._algorithm(group)
        eight = bool(alg._8bit_indices([p], group))
        if eight or f"{alg.state_keys[0]}_scale" in saved:  # 8-bit states saved or wanted: convert
            saved = _8bit.convert_states(p, saved, alg.state_keys, eight)
        for key, value in saved.items():
            if eight and key not in alg.counter_keys:  # already this optimizer's own copies
                state[key] = value
                continue
            if key in alg.counter_keys:
                state[key] = torch.as_tensor(value, dtype=torch.float32).detach().to(
                    step_device(p), copy=True).reshape(())
                continue
            dtype = state_dtype(p, group.get("state_dtype"))
            if is_dtensor(p) or is_dtensor(value):
                state[key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
            else:
                state[key] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(value)
        return state

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, as torch.optim does (pre- and post-hooks, ``param_names``, state of
        non-parameters kept as is), after checking that it fits this optimizer: if it does
        not, nothing changes. State is restored as Note [state precision] says, in this
        optimizer's ``state_dtype`` (8-bit states are decoded, float ones encoded, as needed)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"Invalid state_dict for {name}: expected a dict with 'state' and 'param_groups'")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_containers(state_dict)
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        index_to_param = self._check_checkpoint(saved_groups, state_dict["state"])
        for saved, group in zip(saved_groups, self.param_groups):
            for key in _PRECISION_KEYS:  # this optimizer's choice: the saved states are converted to it
                if key in group:
                    saved[key] = group[key]
        group_of = {index: {**self._group_defaults(saved), **saved} for saved in saved_groups
                    for index in saved["params"]}
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for index, saved in state_dict["state"].items():
            p = index_to_param.get(index)
            if p is None:
                state[index] = saved  # not a parameter's: kept as is, as torch.optim does
            else:  # (an empty state stays empty: save, load and save give the same dict)
                state[p] = self._restore_state(p, saved, group_of[index]) if saved else {}
        for group, saved in zip(self.param_groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self._checked = {}  # states are checked afresh (and the old ones not kept alive)
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.pop("differentiable", None)  # torch.optim adds this option; ours have none
        for group in self.param_groups:  # an older or torch.optim checkpoint may lack some options
            for key, value in self._group_defaults(group).items():
                group.setdefault(key, value)


def _check_readable(p: Tensor, value: Tensor, what: str) -> None:
    """A saved tensor holds values to load: not a meta tensor, unless the parameter is one."""
    if value.device.type == "meta" and p.device.type != "meta":
        raise ValueError(f"Invalid {what}: a meta tensor, which holds no values")


def _name(alg: Algorithm) -> str:
    """An algorithm as an error message names it: its ``name``, else its class's."""
    return getattr(alg, "name", type(alg).__name__)
