"""Fused CPU backends: each parameter element is read and written once per step.

Note [fused CPU]
~~~~~~~~~~~~~~~~
An optimizer step does almost no arithmetic per byte it moves, so its speed is
memory bandwidth. The reference and foreach paths make one pass over memory per
operation (about 6 for Lion, 9 for AdamW); a fused kernel makes one.

* AdamW with float32/float64 parameters and ``correct_bias=True`` is exactly
  torch's update, so it runs torch's own fused CPU kernel
  (``torch._fused_adamw_``): nothing to compile.
* Everything else that is large (Lion; AdamW with ``correct_bias=False`` or
  with bf16/fp16 parameters and float32 state) runs a kernel that
  ``torch.compile`` (Inductor) generates from the few lines of math below: one
  vectorised, multi-threaded C++ loop per tensor. It is compiled once per
  process and dtype combination, with dynamic shapes so one kernel serves every
  tensor size; Inductor's on-disk cache makes later processes start fast. The
  compile time is logged on the ``optimizer`` logger (WARNING, once each).
* Tensors smaller than ``SMALL`` elements, and non-contiguous ones, go through
  the foreach path: calling a compiled kernel costs about 30 us, more than
  moving a small tensor, and their bytes are a tiny part of a model's.
* Without a working C++ compiler the compile fails once; we warn once and use
  the foreach path from then on (``fused=None``), or raise (``fused=True``).

The kernels use the same operations as the references (``lerp``, ``sign``,
``sqrt``) so they agree with them to rounding, and are tested against them at
every step.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import as_real

__all__ = ["SMALL", "available", "flat", "fused_kernel", "pick", "plan"]

log = logging.getLogger("optimizer")
SMALL = 1 << 15  # elements; see Note [fused CPU]
_OPTIONS = {"cpp.dynamic_threads": True}  # parallel loops although the size is symbolic


_compiled: dict[str, Callable[..., None]] = {}
_ready: set[tuple[str, torch.dtype, torch.dtype]] = set()
_failed: list[str] = []
_lock = threading.Lock()


def available() -> bool:
    """False once compiling has failed in this process."""
    return not _failed


def fused_kernel(math: Callable[..., None], n_states: int, n_scalars: int, param_dtype: torch.dtype,
                 state_dtype: torch.dtype, *, required: bool) -> Callable[..., None] | None:
    """``math`` compiled into one fused kernel for these dtypes, compiling it now if needed.

    ``math(p, g, *states, scalars)`` updates ``p`` and the states in place; ``scalars``
    is a 1-D tensor of ``n_scalars`` values in the state dtype (inputs, so a new lr never
    triggers a recompile). Returns None (after one warning) where compiling
    is impossible, or raises if ``required`` (an explicit ``fused=True``).
    """
    name = math.__name__
    key = (name, param_dtype, state_dtype)
    if key in _ready:
        return _compiled[name]
    with _lock:
        if _failed:
            if required:
                raise RuntimeError(f"fused=True: the fused CPU kernels cannot be compiled here ({_failed[0]})")
            return None
        fn = _compiled.setdefault(name, torch.compile(math, dynamic=True, fullgraph=True, options=_OPTIONS))
        start = time.perf_counter()
        try:
            # compile now, on scratch tensors of a size that takes the general (symbolic) path
            n = SMALL + 17
            tensors = [torch.zeros(n, dtype=param_dtype) for _ in range(2)]
            tensors += [torch.zeros(n, dtype=state_dtype) for _ in range(n_states)]
            fn(*tensors, torch.full((n_scalars,), 0.5, dtype=state_dtype))
        except Exception as err:  # noqa: BLE001 - no compiler, a broken toolchain, an unsupported platform
            _failed.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            if required:
                raise RuntimeError(f"fused=True: the fused CPU kernels cannot be compiled here ({_failed[0]})") from err
            warnings.warn(
                f"optimizer: the fused CPU kernels cannot be compiled here ({_failed[0]}); "
                "using the foreach path instead (correct, slower). Install a C++ compiler to enable them.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _ready.add(key)
        log.warning("optimizer: compiled the fused CPU kernel %s for %s parameters in %.1f s (once per process)",
                    name.strip("_"), str(param_dtype).replace("torch.", ""), time.perf_counter() - start)
        return fn


def plan(params: list[Tensor], states: list[Tensor], math: Callable[..., None], n_states: int, n_scalars: int,
         *, strict: bool) -> tuple[list[tuple[int, Callable[..., None]]], list[int]]:
    """(index, compiled kernel) for the tensors a kernel should take, and the indices of the rest
    (small or non-contiguous ones; all of them where nothing can be compiled). ``states`` is one
    state list, whose dtype is the compute dtype."""
    big, rest = [], []
    for i, p in enumerate(params):
        if p.numel() < SMALL or not p.is_contiguous():
            rest.append(i)
            continue
        kernel = fused_kernel(math, n_states, n_scalars, as_real(p).dtype, as_real(states[i]).dtype, required=strict)
        if kernel is None:  # no compiler: warned once; everything goes the foreach way
            return [], list(range(len(params)))
        big.append((i, kernel))
    return big, rest


def flat(t: Tensor) -> Tensor:
    """The 1-D view a kernel runs on (complex tensors as pairs of reals), detached so that every
    call matches the compiled graph's guards (a parameter's view would carry requires_grad)."""
    return as_real(t).detach().view(-1)


def pick(lists: list[list[Any]], idx: list[int]) -> list[list[Any]]:
    """The sub-lists at ``idx`` of parallel lists."""
    return [[lst[i] for i in idx] for lst in lists]
