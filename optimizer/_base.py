"""What every optimizer of this package shares: argument checks, the two-phase
step, state precision and checkpoint validation.

An algorithm file (``adamw.py``, ``lion.py``) only says which hyper-parameters
it has, which state it keeps and how one group is updated; the contract that
``torch.optim`` users rely on lives here once.

Note [two-phase step]
~~~~~~~~~~~~~~~~~~~~~
A step that raises must leave parameters and state exactly as they were. So
``step()`` first *checks* every group (hyper-parameters, gradients) without
touching anything, and only then creates missing state and updates. Every error
we can foresee is raised in the first phase.

Note [state precision]
~~~~~~~~~~~~~~~~~~~~~~
The update is computed in float32 or better (``compute_dtype``). Parameters in
bfloat16/float16 keep their optimizer state in float32 (``state_dtype``);
float32/float64 and complex parameters keep state in their own dtype, as
torch.optim does. ``state_dtype=torch.bfloat16`` (an option of each optimizer)
stores the state of real parameters in bfloat16 to halve its memory: the math
still runs in float32, and each state value is rounded to bfloat16 once per
step, to nearest even. A checkpoint restores state in that precision: torch's
loader would cast it to the parameter dtype, so ``load_state_dict`` re-casts
from the saved tensors.

Note [GradScaler]
~~~~~~~~~~~~~~~~~
Our optimizers set ``_step_supports_amp_scaling``: ``torch.amp.GradScaler.step``
then hands them ``grad_scale`` (divide the gradients by it) and ``found_inf``
(skip the step, changing nothing) as attributes instead of unscaling and
checking on the host itself. The fused GPU kernels use both on the device,
without a sync; the other backends unscale into temporaries and read
``found_inf`` (one sync, as GradScaler's own path would).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Optimizer", "compute_dtype", "state_dtype"]

_LOW_PRECISION = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}
STATE_DTYPES = (None, torch.float32, torch.bfloat16)  # the choices of the state_dtype option


def state_dtype(param: Tensor, requested: torch.dtype | None = None) -> torch.dtype:
    """dtype of the optimizer state for ``param`` (Note [state precision]): ``requested`` (the
    state_dtype option) for real parameters, else float32 for bf16/fp16, else the parameter's."""
    if requested is not None and not param.is_complex():
        return requested
    return _LOW_PRECISION.get(param.dtype, param.dtype)


def compute_dtype(param_dtype: torch.dtype, state: torch.dtype) -> torch.dtype:
    """dtype of the math: float32 or better, and at least as wide as parameter and state."""
    return torch.promote_types(torch.promote_types(param_dtype, state), torch.float32)


def step_device(param: Tensor) -> torch.device:
    """Where a step counter lives: on the parameter's accelerator (read by the fused kernels
    without a sync, as torch.optim's fused/capturable steps), on the CPU otherwise."""
    return param.device if param.device.type == "cuda" else torch.device("cpu")


def check_state_dtype(value: Any) -> None:
    if value not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {value!r} (must be None, torch.float32 or torch.bfloat16)")


def amp_grads(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> list[Tensor] | None:
    """Note [GradScaler] for backends without it in their kernels: None when the step must be
    skipped, else the gradients divided by ``grad_scale`` (new tensors; the .grad stay as they are)."""
    if found_inf is not None and float(found_inf) != 0:
        return None
    if grad_scale is not None:
        return [g / grad_scale.to(g.device) for g in grads]
    return grads


# ---------------------------------------------------------------------------
# argument checks: each error names the argument and the value
# ---------------------------------------------------------------------------

def _as_float(name: str, value: Any) -> float | None:
    """``value`` as a float, or None for a one-element tensor on an accelerator (reading it would sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one value, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: expected a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and not (lr.is_floating_point()):
        raise ValueError(f"Invalid learning rate: a tensor lr must be floating point, got dtype {lr.dtype}")
    value = _as_float("learning rate", lr)
    if value is not None and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid learning rate: lr={value} (must be finite and >= 0)")


def check_nonnegative(name: str, value: Any) -> None:
    v = _as_float(name, value)
    if v is not None and not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name} value: {name}={v} (must be finite and >= 0)")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        b = _as_float(f"beta parameter at index {i}", beta)
        if b is not None and not (0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")


def check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name}: {value!r} (must be {allowed})")


_GRAD, _LAYOUT, _SHAPE = operator.attrgetter("grad"), operator.attrgetter("layout"), operator.attrgetter("shape")
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")


class Optimizer(torch.optim.Optimizer):
    """Base of this package's optimizers (a real ``torch.optim.Optimizer``).

    Subclasses set ``state_keys`` (tuple of state names), implement
    ``_check_group(group)``, ``_init_state(param, state)`` and
    ``_update_group(group, params, grads)``.
    """

    state_keys: tuple[str, ...] = ()
    _step_supports_amp_scaling = True  # Note [GradScaler]
    # group keys a checkpoint of this algorithm always has; others may be missing (then the
    # defaults fill them), so a torch.optim.AdamW checkpoint loads into our AdamW
    checkpoint_keys: tuple[str, ...] = ("lr", "betas", "weight_decay")

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, Tensor):
            raise TypeError(
                "Invalid params: expected an iterable of Tensors or of dicts (parameter groups), "
                f"got a single Tensor of shape {tuple(params.shape)}; pass [tensor] or model.parameters()"
            )
        if not isinstance(params, Iterable):
            raise TypeError(f"Invalid params: expected an iterable of Tensors or dicts, got {params!r}")
        params = list(params)
        if len(params) == 0:
            raise ValueError("Invalid params: the parameter list is empty (did the model define any parameters?)")
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

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
        if len(params) == 0:
            raise ValueError(f"Invalid params: parameter group {len(self.param_groups)} has no parameters")
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        seen = {id(p): f"parameter group {gi}" for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for i, p in enumerate(tensors):
            if isinstance(p, Tensor) and id(p) in seen:
                raise ValueError(
                    f"Invalid params: parameter {i} of group {len(self.param_groups)} "
                    f"(shape {tuple(p.shape)}) already appears in {seen[id(p)]}; "
                    "a parameter may appear once only (it would be updated twice)"
                )
            seen[id(p)] = "the same group"
        filled = {**self.defaults, **param_group}
        self._check_group(filled)
        super().add_param_group({**param_group, "params": params})

    # ----- the step, Note [two-phase step] ------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                      states: list[dict[str, Any]], amp: dict[str, Tensor | None]) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _gather(self, gi: int, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Phase 1: the parameters of ``group`` that have a gradient, checked; changes nothing."""
        self._check_group(group)
        params = [p for p in group["params"] if p.grad is not None]
        grads = list(map(_GRAD, params))
        # the common case checked with C-level maps (this runs every step), the culprit found after
        ok = (set(map(_LAYOUT, grads)) <= {torch.strided}
              and list(map(_SHAPE, grads)) == list(map(_SHAPE, params))
              and list(map(_DTYPE, grads)) == list(map(_DTYPE, params))
              and list(map(_DEVICE, grads)) == list(map(_DEVICE, params)))
        if not ok:
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is not None and (g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype
                                      or g.device != p.device):
                    self._bad_grad(gi, i, p, g)
        return params, grads

    def _bad_grad(self, gi: int, i: int, p: Tensor, g: Tensor) -> None:
        name, where = type(self).__name__, f"parameter {i} of group {gi} (shape {tuple(p.shape)})"
        if g.layout != torch.strided:
            raise RuntimeError(
                f"{name} does not support sparse gradients ({where} has a {g.layout} gradient); "
                "use torch.optim.SparseAdam for sparse embeddings, or nn.Embedding(sparse=False)"
            )
        if g.shape != p.shape:
            raise RuntimeError(f"{name}: {where} has a gradient of shape {tuple(g.shape)}")
        raise RuntimeError(f"{name}: {where} ({p.dtype} on {p.device}) has a gradient of dtype {g.dtype} on {g.device}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._gather(gi, group) for gi, group in enumerate(self.param_groups)]
        # set by torch.amp.GradScaler.step for the duration of this call (Note [GradScaler])
        amp = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}
        for group, (params, grads) in zip(self.param_groups, work):
            if not params:
                continue
            states = list(map(self.state.__getitem__, params))
            for p, state in zip(params, states):
                if not state:
                    self._init_state(p, state, group)
            self._update_group(group, params, grads, states, amp)
        return loss

    # ----- checkpoints ---------------------------------------------------------

    def _check_state(self, p: Tensor, state: dict[str, Any], where: str) -> None:
        keys = set(state)
        if keys != set(self.state_keys):
            raise ValueError(
                f"Invalid state for {where}: {type(self).__name__} keeps {sorted(self.state_keys)}, "
                f"found {sorted(map(str, keys))} (is it another optimizer's checkpoint?)"
            )
        for key in self.state_keys:
            v = state[key]
            if key == "step":
                if not (isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1)):
                    raise ValueError(f"Invalid state['step'] for {where}: {v!r}")
            elif not isinstance(v, Tensor) or v.shape != p.shape:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"Invalid state[{key!r}] for {where}: shape {shape}, expected {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint after checking it fits this optimizer; nothing changes if it does not."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"Invalid state_dict for {name}: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict for {name}: it has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        index_to_param: dict[Any, Tensor] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            missing = sorted(k for k in self.checkpoint_keys if k not in saved)
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
            self._check_group({**self.defaults, **saved})
            index_to_param.update(zip(saved["params"], group["params"]))
        for index, state in state_dict["state"].items():
            if index in index_to_param:
                self._check_state(index_to_param[index], state, f"saved parameter {index}")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # Note [state precision]: re-cast from the saved tensors, not from torch's down-cast copies.
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for index, saved in state_dict["state"].items():
            p = index_to_param.get(index)
            if p is None:
                continue
            for key, value in saved.items():
                if key == "step":
                    self.state[p]["step"] = torch.as_tensor(value, dtype=torch.float32).detach().to(
                        step_device(p), copy=True).reshape(())
                else:
                    dtype = state_dtype(p, group_of[p].get("state_dtype"))
                    self.state[p][key] = value.detach().to(device=p.device, dtype=dtype, copy=True)


def group_by_device_and_dtype(*tensor_lists: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel lists into buckets of one (device, dtype of the first list) for foreach ops."""
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in tensor_lists])
        for lst, t in zip(bucket, items):
            lst.append(t)
    return buckets


@dataclass
class Bucket:
    """The tensors of one (device, dtype) bucket, as the foreach math sees them."""

    params: list[Tensor]  # in the compute dtype (the parameters themselves when no cast is needed)
    grads: list[Tensor]  # in the compute dtype, negated when maximising
    states: list[list[Tensor]]  # each state list, complex ones viewed as real
    lr: float | Tensor  # a tensor lr moved to the bucket's device and compute dtype (no sync)


def foreach_buckets(
    params: list[Tensor], grads: list[Tensor], *states: list[Tensor], maximize: bool, lr: float | Tensor
) -> Iterator[Bucket]:
    """Split parallel lists into :class:`Bucket` s for the ``_foreach`` ops.

    The math runs in ``compute_dtype`` of the parameter and the first state (Note
    [state precision]). After the caller's loop body has updated a bucket,
    low-precision parameters and states get the result written back, before the
    next bucket is handed out.
    """
    buckets = group_by_device_and_dtype(params, grads, *states)
    for (device, _), (b_params, b_grads, *b_states) in buckets.items():
        b_states = [[as_real(t) for t in lst] for lst in b_states]
        params_r = [as_real(p) for p in b_params]
        cdt = compute_dtype(params_r[0].dtype, b_states[0][0].dtype)
        p32 = params_r if cdt == params_r[0].dtype else [p.to(cdt) for p in params_r]
        s32 = [lst if lst[0].dtype not in _LOW_PRECISION else [t.to(cdt) for t in lst] for lst in b_states]
        g32 = [as_real(g).to(cdt) for g in b_grads]
        if maximize:
            g32 = torch._foreach_neg(g32)
        lr_d = lr.to(device=device, dtype=cdt) if isinstance(lr, Tensor) else lr
        yield Bucket(p32, g32, s32, lr_d)
        for low, high in [(params_r, p32), *zip(b_states, s32)]:
            if high is not low:
                torch._foreach_copy_(low, high)


def local(t: Tensor) -> Tensor:
    """The memory a kernel updates: a DTensor's local shard (FSDP2 parameters, their gradients
    and states), else ``t`` itself. Element-wise updates need nothing from other ranks."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


_IS_CUDA, _IS_CPU = operator.attrgetter("is_cuda"), operator.attrgetter("is_cpu")


def device_types(tensors: list[Tensor]) -> set[str]:
    """{t.device.type for t in tensors}, without building a device object per tensor (this
    runs every step: C-level maps over the list in the common all-CUDA or all-CPU cases)."""
    if all(map(_IS_CUDA, tensors)):
        return {"cuda"} if tensors else set()
    if all(map(_IS_CPU, tensors)):
        return {"cpu"}
    return {t.device.type for t in tensors}


def on_triton_devices(tensors: list[Tensor]) -> list[int]:
    """Indices of the tensors the fused backends send to the Triton kernels (TRITON_DEVICES)."""
    types = device_types(tensors)
    if types <= TRITON_DEVICES:
        return list(range(len(tensors)))
    if not types & TRITON_DEVICES:
        return []
    return [i for i, t in enumerate(tensors) if t.device.type in TRITON_DEVICES]


def pick(lists: list[list[Any]], idx: list[int]) -> list[list[Any]]:
    """The sub-lists at ``idx`` of parallel lists."""
    return [[lst[i] for i in idx] for lst in lists]


def fused_gpu_first(kernel: str, lists: list[list[Tensor]], hyper: dict[str, Any], grad_scale: Tensor | None,
                    found_inf: Tensor | None, strict: bool) -> list[list[Tensor]] | None:
    """The first part of a fused backend: the tensors on TRITON_DEVICES go to the Triton kernel
    ``kernel`` of _fused_triton (Note [fused GPU]; it applies GradScaler itself). Returns the
    parallel lists of the others (CPU ones, any the kernel did not take) with their gradients
    through GradScaler, for the host side; None when nothing is left or the step is skipped."""
    params = lists[0]
    rest = list(range(len(params)))
    gpu = on_triton_devices(params)
    kernels = load_triton(strict) if gpu else None
    if kernels is not None:
        whole = len(gpu) == len(params)  # the common case: no index juggling
        left = getattr(kernels, kernel)(*(lists if whole else pick(lists, gpu)), **hyper, grad_scale=grad_scale,
                                        found_inf=found_inf)
        done = set(gpu) - {gpu[j] for j in left}
        rest = [i for i in rest if i not in done]
    if not rest:
        return None
    lists = pick(lists, rest)
    lists[1] = amp_grads(lists[1], grad_scale, found_inf)
    return None if lists[1] is None else lists  # None: GradScaler found inf/nan, skip the step


def as_real(t: Tensor) -> Tensor:
    """A complex tensor is optimised as its real and imaginary parts (torch.optim's convention)."""
    return torch.view_as_real(t) if t.is_complex() else t


_triton: dict[str, Any] = {}
# device types whose parameters the fused backends send to the Triton kernels; the tests add
# "cpu" to run them through Triton's interpreter (TRITON_INTERPRET=1)
TRITON_DEVICES = {"cuda"}


def load_triton(strict: bool) -> Any:
    """The fused GPU kernels (``_fused_triton``, imported on first use: ``import optimizer``
    needs only torch), or None after one warning where Triton cannot be imported; an
    explicit ``fused=True`` (``strict``) raises instead."""
    if "module" not in _triton:
        try:
            from . import _fused_triton

            _triton["module"] = _fused_triton
        except Exception as err:  # noqa: BLE001 - no triton, or one that cannot initialise here
            _triton["module"], _triton["error"] = None, f"{type(err).__name__}: {err}"
            if not strict:
                warnings.warn(
                    f"optimizer: the fused GPU kernels need Triton, which cannot be imported here "
                    f"({_triton['error']}); using the foreach path instead (correct, slower). pip install triton",
                    RuntimeWarning,
                    stacklevel=5,
                )
    if _triton["module"] is None and strict:
        raise RuntimeError(f"fused=True: the fused GPU kernels need Triton ({_triton['error']}); "
                           "pip install triton, or pass foreach=True")
    return _triton["module"]


def check_backend(group: dict[str, Any]) -> None:
    check_flag("foreach", group["foreach"], allow_none=True)
    check_flag("fused", group["fused"], allow_none=True)
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid backend: foreach=True and fused=True; choose one")


def choose_backend(params: list[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """The backend a step runs: "fused", "foreach" or "reference".

    ``None`` means "choose for me"; the choice is the fastest correct path:

    * CPU and CUDA: the fused path (Note [fused CPU] in _fused_cpu.py, Note
      [fused GPU] in _fused_triton.py). Measured with ``python -m optimizer
      bench`` against torch's fused AdamW, see the README, 'Backends'. Without a
      C compiler, or without Triton, it falls back to foreach with one warning.
    * CUDA with ``fused=False``: foreach, one kernel launch per operation instead
      of one per tensor and operation.
    * elsewhere, or CPU with ``fused=False``: the per-tensor loop, which on the
      2-core CI machine is as fast as foreach for AdamW and holds temporaries
      for one tensor at a time rather than for the whole model.

    An explicit ``fused=True`` that cannot be met raises rather than falling back.
    """
    if fused and foreach:
        raise ValueError("Invalid backend: foreach=True and fused=True; choose one")
    devices = device_types(params)
    if fused:
        if devices - {"cpu", "cuda"}:
            raise RuntimeError(
                f"fused=True: fused kernels exist for CPU and CUDA parameters (got {sorted(devices)}); "
                "use foreach=True there"
            )
        return "fused"
    if foreach:
        return "foreach"
    if foreach is None and fused is None and devices <= {"cpu", "cuda"}:
        return "fused"
    if foreach is None and devices == {"cuda"}:
        return "foreach"
    return "reference"
