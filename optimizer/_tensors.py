"""Tensor helpers every backend uses: state precision, views, buckets, layouts.

A leaf module: it imports nothing from this package.

Note [state precision]
~~~~~~~~~~~~~~~~~~~~~~
The update is computed in float32 or better (``compute_dtype``). Parameters in
bfloat16/float16 keep their optimizer state in float32 (``state_dtype``);
float32/float64 and complex parameters keep state in their own dtype, as
torch.optim does. ``state_dtype=torch.bfloat16`` (an option of each optimizer)
stores the state of real parameters in bfloat16 to halve its memory: the math
still runs in float32, and each state value is rounded to bfloat16 once per
step, to nearest even. A checkpoint restores state in that precision: torch's
loader would cast it to the parameter dtype, so ``load_state_dict`` casts from
the saved tensors itself.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOW_PRECISION = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.uint8)  # the choices of the state_dtype option


def state_dtype(param: Tensor, requested: torch.dtype | None = None) -> torch.dtype:
    """dtype of the optimizer state for ``param`` (Note [state precision]): ``requested`` (the
    state_dtype option) for real parameters, else float32 for bf16/fp16, else the parameter's."""
    if requested is not None and requested != torch.uint8 and not param.is_complex():
        return requested  # (uint8: the tensors it does not quantise keep the default, Note [8-bit states])
    return LOW_PRECISION.get(param.dtype, param.dtype)


def compute_dtype(param_dtype: torch.dtype, state: torch.dtype) -> torch.dtype:
    """dtype of the math: float32 or better, and at least as wide as parameter and state."""
    return torch.promote_types(torch.promote_types(param_dtype, state), torch.float32)


def step_device(param: Tensor) -> torch.device:
    """Where a step counter lives: on the parameter's accelerator (read by the fused kernels
    without a sync, as torch.optim's fused/capturable steps), on the CPU otherwise."""
    return param.device if param.device.type == "cuda" else torch.device("cpu")


def as_real(t: Tensor) -> Tensor:
    """A complex tensor is optimised as its real and imaginary parts (torch.optim's convention)."""
    return torch.view_as_real(t) if t.is_complex() else t


def local(t: Tensor) -> Tensor:
    """The memory a kernel updates: a DTensor's local shard (FSDP2 parameters, their gradients
    and states), else ``t`` itself. Element-wise updates need nothing from other ranks."""
    return t.to_local() if is_dtensor(t) else t


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, its gradient or
    state). By the type's name: importing torch.distributed to ask would cost every process its
    import time, and a process without torch.distributed cannot hold a DTensor."""
    return type(t).__name__ == "DTensor"


def host_value(x: float | Tensor) -> float | Tensor:
    """A one-element tensor read as a Python number, as the eager references want it; under
    ``torch.compile`` the tensor itself (reading it would break the graph), as torch.optim does."""
    if torch.compiler.is_compiling() or not isinstance(x, Tensor):
        return x
    return x.item()


def pick(lists: list[list[Any]], idx: list[int]) -> list[list[Any]]:
    """The sub-lists at ``idx`` of parallel lists."""
    return [[lst[i] for i in idx] for lst in lists]


_IS_CUDA, _IS_CPU = operator.attrgetter("is_cuda"), operator.attrgetter("is_cpu")
_DTYPE, _DEVICE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("shape")


def device_types(tensors: list[Tensor]) -> set[str]:
    """{t.device.type for t in tensors}, without building a device object per tensor (this
    runs every step: C-level maps over the list in the common all-CUDA or all-CPU cases)."""
    if all(map(_IS_CUDA, tensors)):
        return {"cuda"} if tensors else set()
    if all(map(_IS_CPU, tensors)):
        return {"cpu"}
    return {t.device.type for t in tensors}


# parameter dtypes the optimizers update (complex ones as pairs of reals); not integers or float8
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
                torch.complex128)


class Meta:
    """Shapes, dtypes and devices of a list of parameters, read once per step with C-level maps,
    to compare the gradients' and states' with."""

    def __init__(self, params: list[Tensor]) -> None:
        self.shapes = list(map(_SHAPE, params))
        self.dtypes = list(map(_DTYPE, params))
        self.types = device_types(params)
        self._params = params
        self._devices: list[Any] | None = None

    def device_indices(self) -> list[Any]:
        """Each parameter's device (its index where all are of one device type), read once."""
        if self._devices is None:
            self._devices = (list(map(Tensor.get_device, self._params)) if len(self.types) == 1
                             else list(map(_DEVICE, self._params)))
        return self._devices

    def same_devices(self, tensors: list[Tensor]) -> bool:
        if len(self.types) == 1 and device_types(tensors) == self.types:  # one device type: compare indices
            return list(map(Tensor.get_device, tensors)) == self.device_indices()
        return list(map(_DEVICE, tensors)) == list(map(_DEVICE, self._params))

    def same(self, tensors: list[Tensor], dtypes: list[torch.dtype] | None = None) -> bool:
        """Each tensor has its parameter's shape, device and dtype (or ``dtypes``)."""
        return (list(map(_SHAPE, tensors)) == self.shapes and list(map(_DTYPE, tensors)) == (dtypes or self.dtypes)
                and self.same_devices(tensors))

    def bad_dtype(self) -> int | None:
        """The index of the first parameter of a dtype the optimizers do not update, if any."""
        if set(self.dtypes) <= set(PARAM_DTYPES):
            return None
        return next(i for i, d in enumerate(self.dtypes) if d not in PARAM_DTYPES)


def dense(t: Tensor) -> bool:
    """True if ``t``'s elements fill ``t.numel()`` consecutive places of memory from
    ``t.data_ptr()`` (contiguous, channels_last, a transposed matrix...): a kernel that walks
    memory then visits each element once."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def shares_memory(t: Tensor) -> bool:
    """Whether some elements of ``t`` are one place in memory: a zero stride on a dimension of more
    than one element (an expanded tensor), what torch's in-place operations refuse to write
    (``torch._debug_has_internal_overlap`` says "yes" exactly there). Other overlapping layouts
    (``as_strided``) torch writes without a word, and so does a step."""
    t = local(t)
    if t.layout != torch.strided:
        return False
    strides = t.stride()
    return 0 in strides and any(stride == 0 and size > 1 for size, stride in zip(t.shape, strides))


def first_sharing_memory(tensors: list[Tensor]) -> int | None:
    """The index of the first tensor whose elements share memory (:func:`shares_memory`), or None;
    a step asks every time, so the common case, all contiguous, is one C-level map."""
    if all(map(Tensor.is_contiguous, tensors)):
        return None
    return next((i for i, t in enumerate(tensors) if not t.is_contiguous() and shares_memory(t)), None)


def same_dense_layout(tensors: tuple[Tensor, ...]) -> bool:
    """The tensors share one dense layout: the i-th element in memory is the same element of each."""
    first = tensors[0]
    stride = first.stride()
    return all(t.stride() == stride and t.shape == first.shape for t in tensors[1:]) and dense(first)


def amp_grads(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> list[Tensor] | None:
    """Note [GradScaler] for backends without it in their kernels: None when the step must be
    skipped, else the gradients divided by ``grad_scale`` (new tensors; the .grad stay as they are)."""
    if found_inf is not None and float(found_inf) != 0:
        return None
    if grad_scale is not None:
        return [g / grad_scale.to(g.device).reshape(()) for g in grads]
    return grads


def group_by_device_and_dtype(
    *tensor_lists: list[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel lists into buckets of one (device, dtype of the first list) for foreach ops."""
    first = tensor_lists[0]
    if (first and not torch.compiler.is_compiling()  # (Dynamo cannot trace the C-level maps)
            and len(set(map(_DTYPE, first))) == 1 and len(set(map(_DEVICE, first))) == 1):  # the usual case
        return {(first[0].device, first[0].dtype): [list(lst) for lst in tensor_lists]}
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in tensor_lists])
        for lst, t in zip(bucket, items):
            lst.append(t)
    return buckets


@dataclass
class Bucket:
    """The tensors of one bucket (device, parameter dtype, state dtypes), as the foreach math sees them."""

    params: list[Tensor]  # in the compute dtype (the parameters themselves when no cast is needed)
    grads: list[Tensor]  # in the compute dtype, negated when maximising
    states: list[list[Tensor]]  # each state list in the compute dtype, complex ones viewed as real
    counters: list[Tensor]  # the step counters (AdamW), as they are
    lr: float | Tensor  # a tensor lr moved to the bucket's device and compute dtype, 0-dim (no sync)


def foreach_buckets(
    params: list[Tensor], grads: list[Tensor], *states: list[Tensor], counters: list[Tensor] | None = None,
    maximize: bool, lr: float | Tensor,
) -> Iterator[Bucket]:
    """Split parallel lists into :class:`Bucket` s for the ``_foreach`` ops.

    The math runs in ``compute_dtype`` of the parameter and its states (Note [state
    precision]). After the caller's loop body has updated a bucket, parameters and
    states computed in another dtype get the result written back, before the next
    bucket is handed out.
    """
    if torch.compiler.is_compiling() and not isinstance(lr, Tensor):
        # a float lr would be baked into the foreach ops' Scalar arguments (a recompile for each
        # value a scheduler sets); as a tensor it stays an input of the graph (made by a product:
        # torch.tensor(lr) would bake it in too)
        lr = torch.ones((), dtype=torch.float64) * lr
    lists = [params, grads, *states, *([counters] if counters is not None else [])]
    for b_params, b_grads, *rest in _buckets(lists, len(states)):
        b_states, b_counters = rest[:len(states)], (rest[len(states)] if counters is not None else [])
        b_states = [[as_real(t) for t in lst] for lst in b_states]
        params_r = [as_real(p) for p in b_params]
        cdt = compute_dtype(params_r[0].dtype, params_r[0].dtype)  # float32 or better
        for lst in b_states:
            cdt = compute_dtype(cdt, lst[0].dtype)
        p32 = params_r if cdt == params_r[0].dtype else [p.to(cdt) for p in params_r]
        s32 = [lst if lst[0].dtype == cdt else [t.to(cdt) for t in lst] for lst in b_states]
        g32 = [as_real(g).to(cdt) for g in b_grads]
        if maximize:
            g32 = torch._foreach_neg(g32)
        device = b_params[0].device
        lr_d = lr.to(device=device, dtype=cdt).reshape(()) if isinstance(lr, Tensor) else lr
        yield Bucket(p32, g32, s32, b_counters, lr_d)
        for low, high in [(params_r, p32), *zip(b_states, s32)]:
            if high is not low:
                torch._foreach_copy_(low, high)


def _buckets(lists: list[list[Tensor]], n_states: int) -> list[list[list[Tensor]]]:
    """Parallel sub-lists of one device, parameter dtype and state dtypes each."""
    keyed = lists[:2 + n_states]
    if not torch.compiler.is_compiling() and all(  # the usual case: one bucket (C-level maps)
            len(set(map(_DTYPE, lst))) <= 1 for lst in keyed) and len(set(map(_DEVICE, lists[0]))) <= 1:
        return [[list(lst) for lst in lists]] if lists[0] else []
    buckets: dict[tuple[Any, ...], list[list[Tensor]]] = {}
    for items in zip(*lists):
        key = (items[0].device, *(t.dtype for t in items[:2 + n_states]))
        bucket = buckets.setdefault(key, [[] for _ in lists])
        for lst, t in zip(bucket, items):
            lst.append(t)
    return list(buckets.values())
