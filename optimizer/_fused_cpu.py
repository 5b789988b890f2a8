"""Fused CPU backends: each element is read and written once, one call per step.

Note [fused CPU]
~~~~~~~~~~~~~~~~
An optimizer step does almost no arithmetic per byte it moves, so its speed is
memory bandwidth. The reference and foreach paths make one pass over memory per
operation (about 6 for Lion, 9 for AdamW); a fused kernel makes one.

* AdamW with float32/float64 parameters and ``correct_bias=True`` is exactly
  torch's update, so it runs torch's own fused CPU kernel
  (``torch._fused_adamw_``); the C library only counts its steps (Note [step counters]).
* Everything else (Lion; AdamW with ``correct_bias=False`` or with bf16/fp16
  parameters and float32 state) runs a small C loop: each algorithm file states
  its per-element update as a few lines of C (a :class:`Kernel`), and this
  module wraps them in one loop over *all* tensors of a step, cut into blocks
  shared by the threads (OpenMP), compiled with the system C compiler (``$CC``,
  else ``cc``) for this machine (``-O3 -march=native``: vectorised), and called
  through ``ctypes``: one call per step and dtype, whatever the number of
  tensors. It is compiled on the first step that needs it, once per process
  (about 0.3 s; the time is logged at INFO on the ``optimizer`` logger), while
  the step is checked (Note [two-phase step]): a failure cannot leave a step half done.
* Why not ``torch.compile``: Inductor generates the same loop, but per tensor,
  and each call of a compiled function costs about 37 us of Python; with 26
  large tensors that was 1 ms of a 13 ms step, and the small tensors had to go
  the foreach way. Its first compile also took 8-17 s instead of 0.3 s.
* Whatever goes wrong (no compiler, ``$CC`` failing or writing nothing, a
  library that cannot be loaded from a ``noexec`` temporary folder), it goes
  wrong once: we warn once and use the foreach path from then on
  (``fused=None``), or raise before anything changed (``fused=True``).
  ``$CC`` is read as a command line (``CC="ccache gcc"``). A build folder left
  by a process killed while compiling is removed by the next compile.
* The loop walks memory, not indices: a tensor goes to it only if its
  parameter, gradient and states share one dense layout (any: contiguous,
  channels_last, a transposed parameter with a gradient of the same strides);
  others go the foreach way, which follows indices.

The C loops use the operations of the references (torch's ``lerp`` formula,
``sign`` with sign(0) = sign(nan) = 0, ``sqrt``), in the state's precision, and
round into bf16/fp16 parameters once, to nearest even, as torch does; they are
tested against the references at every step.
"""

from __future__ import annotations

import ctypes
import operator
import itertools
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._tensors import as_real, local

__all__ = ["BLOCK", "Kernel", "library", "run"]

log = logging.getLogger("optimizer")
BLOCK = 1 << 14  # elements a thread takes at a time


@dataclass(frozen=True)
class Kernel:
    """An element-wise update in C. ``body`` reads and assigns the locals ``p`` (the
    parameter), ``g`` (the gradient, already negated when maximising) and one local per
    state, all of type ``T`` (the state's precision), and may read the ``scalars`` (the
    same for every tensor) and ``per_tensor`` values (one per tensor) by name."""

    name: str
    states: tuple[str, ...]
    scalars: tuple[str, ...]
    body: str
    per_tensor: tuple[str, ...] = ()


# (parameter dtype, state dtype) -> the C storage types of parameter and state, and the compute type T
_C_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bf16", torch.float16: "f16"}
_VARIANTS: dict[tuple[torch.dtype, torch.dtype], tuple[str, str, str]] = {
    (torch.float64, torch.float64): ("double", "double", "double"),
    **{(p, s): (_C_TYPES[p], _C_TYPES[s], "float")
       for p in (torch.float32, torch.bfloat16, torch.float16) for s in (torch.float32, torch.bfloat16)},
}

_CSRC = pathlib.Path(__file__).with_name("csrc")  # shipped as package data


def _function_name(kernel: Kernel, ptype: str, stype: str) -> str:
    return f"{kernel.name}_{ptype}_{stype}"


def _macro(name: str, lines: list[str]) -> str:
    """``#define name`` spanning ``lines`` (continued with backslashes), or empty."""
    if not lines:
        return f"#define {name}\n"
    width = max(map(len, lines))
    padded = [f"    {line:{width}s} \\" for line in lines[:-1]] + [f"    {lines[-1]}"]
    return f"#define {name} \\\n" + "\n".join(padded) + "\n"


def source(kernel: Kernel) -> str:
    """The C translation unit for ``kernel``: csrc/fused_prelude.h, the kernel's own macros, and
    csrc/fused_loop.c once per dtype variant (one function each). Compiled as it is printed."""
    loop = (_CSRC / "fused_loop.c").read_text()
    n = len(kernel.per_tensor)
    parts = [
        f"/* generated by optimizer._fused_cpu.source for the kernel {kernel.name!r} */\n#define BLOCK {BLOCK}\n",
        (_CSRC / "fused_prelude.h").read_text(),
        f"\n/* the {kernel.name} kernel (written beside its Python reference) */\n",
        _macro("KERNEL_SCALARS", [f"const T {s} = (T)scalars[{j}];" for j, s in enumerate(kernel.scalars)]),
        _macro("KERNEL_STATES", [f"STYPE *restrict S_{s} = (STYPE *)tp[{2 + j}];" for j, s in enumerate(kernel.states)]),
        _macro("KERNEL_PER_TENSOR", [f"const T {s} = (T)per_tensor[t * {n} + {j}];" for j, s in enumerate(kernel.per_tensor)]),
        _macro("KERNEL_LOAD", [f"T {s} = CAT(load_, STYPE)(S_{s}[i]);" for s in kernel.states]),
        _macro("KERNEL_BODY", [line.strip() for line in kernel.body.strip().splitlines()]),
        _macro("KERNEL_STORE", [f"S_{s}[i] = CAT(store_, STYPE)({s});" for s in kernel.states]),
    ]
    body_only = loop[loop.index("*/") + 2:].lstrip("\n")  # the loop's header comment once, at the first variant
    for index, (ptype, stype, ctype) in enumerate(_VARIANTS.values()):
        defines = {"FN": _function_name(kernel, ptype, stype), "T": ctype, "PTYPE": ptype, "STYPE": stype,
                   "N_PTRS": 2 + len(kernel.states)}
        parts += [f"\n/* parameters {ptype}, states {stype}, computed in {ctype} */\n",
                  "#ifdef HAVE_F16\n" if ptype == "f16" else "",
                  "".join(f"#define {name} {value}\n" for name, value in defines.items()), loop if index == 0 else body_only,
                  "".join(f"#undef {name}\n" for name in defines), "#endif\n" if ptype == "f16" else ""]
    return "".join(parts)


_libraries: dict[str, dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr]] = {}
_failed: list[str] = []
_warned: list[bool] = []
_lock = threading.Lock()
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # best first; the last is single-threaded
_DIR_PREFIX = "clearoptim-build-"


def _compiler() -> list[str]:
    """The C compiler's command line: ``$CC`` parsed as a shell would (``CC="ccache gcc"``), else ``cc``."""
    try:
        cmd = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as err:
        raise RuntimeError(f"CC={os.environ['CC']!r} cannot be parsed ({err})") from err
    if not cmd or shutil.which(cmd[0]) is None:
        raise RuntimeError(f"no C compiler: {(cmd or [''])[0]!r} not found (set CC)")
    return cmd


def _remove_stale_build_dirs() -> None:
    """Build folders of processes that died while compiling (killed: no ``finally`` ran)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        except (ValueError, OSError):  # not ours to judge: a malformed name, or another user's process
            pass


def _compile(kernel: Kernel) -> tuple[dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr], str]:
    """Compile ``kernel`` with the system C compiler and load it: (the functions by dtypes, the
    flags used). Raises RuntimeError, whatever went wrong (no compiler, a failed build, a
    library that cannot be loaded, e.g. from a ``noexec`` temporary folder)."""
    cc = _compiler()
    _remove_stale_build_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{_DIR_PREFIX}{os.getpid()}-") as tmp:
        src, lib_path = os.path.join(tmp, f"{kernel.name}.c"), os.path.join(tmp, f"{kernel.name}.so")
        with open(src, "w") as f:
            f.write(source(kernel))
        errors = []
        for flags in _FLAG_SETS:
            cmd = [*cc, "-O3", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", *flags, src,
                   "-o", lib_path]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as err:
                raise RuntimeError(f"{shlex.join(cc)!r} could not run: {err}") from err
            if done.returncode == 0:
                break
            errors.append((done.stderr.strip().splitlines() or ["failed"])[0])
        else:
            raise RuntimeError(f"{shlex.join(cc)!r} failed: {errors[-1]}")
        try:
            lib = ctypes.CDLL(lib_path)  # loaded: the file may go
        except OSError as err:
            raise RuntimeError(f"the compiled library cannot be loaded ({err})") from err
    fns = {}
    for dtypes, (ptype, stype, _) in _VARIANTS.items():
        fn = getattr(lib, _function_name(kernel, ptype, stype), None)  # no fp16 variant where C lacks _Float16
        if fn is not None:
            fn.restype = None
            fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_int, ctypes.c_int]
            fns[dtypes] = fn
    if not fns:
        raise RuntimeError(f"the compiled library has none of the {kernel.name} functions")
    for dtype, ctype in ((torch.float32, "float"), (torch.float64, "double")):
        fn = getattr(lib, f"count_steps_{ctype}")
        fn.restype, fn.argtypes = None, [ctypes.c_int64, ctypes.c_void_p]
        fns[("count", dtype)] = fn
    return fns, " ".join(flags) or "single-threaded"


def library(kernel: Kernel, *, strict: bool, warn: bool = True
            ) -> dict[tuple[Any, torch.dtype], ctypes._CFuncPtr] | None:
    """The compiled variants of ``kernel`` by (parameter dtype, state dtype), and its step
    counters' functions by ("count", dtype), compiling them now if needed; None where that is
    impossible (with one warning per process, if ``warn``), or RuntimeError if ``strict``
    (``fused=True``). Called while a step is being checked, before anything changes."""
    fns = _libraries.get(kernel.name)
    if fns is not None:
        return fns
    with _lock:
        if kernel.name not in _libraries and not _failed:
            start = time.perf_counter()
            try:
                _libraries[kernel.name], how = _compile(kernel)
            except Exception as err:  # noqa: BLE001 - any failure means: no fused CPU kernels here
                _failed.append(f"{type(err).__name__}: {err}" if not isinstance(err, RuntimeError) else str(err))
            else:
                log.info("optimizer: compiled the fused CPU kernel %s (%s) in %.2f s (once per process)",
                         kernel.name, how, time.perf_counter() - start)
        if _failed:
            if strict:
                raise RuntimeError(f"fused=True: the fused CPU kernels cannot be compiled here ({_failed[0]})")
            if warn and not _warned:
                _warned.append(True)
                warnings.warn(
                    f"optimizer: the fused CPU kernels cannot be compiled here ({_failed[0]}); "
                    "using the foreach path instead (correct, slower). Install a C compiler to enable them.",
                    RuntimeWarning,
                    stacklevel=6,
                )
            return None
        return _libraries[kernel.name]


# launch plans of recent steps (Note [fused CPU]: "the host work of a step")
_PLANS: OrderedDict[tuple, list[tuple[ctypes._CFuncPtr, list[int] | None, int, Any, Any, Any]]] = OrderedDict()
_PLANS_KEPT = 32
_DTYPE, _DEVICE_TYPE = operator.attrgetter("dtype"), operator.attrgetter("device.type")


def _plan(kernel: Kernel, lists: list[list[Tensor]]) -> list[tuple[ctypes._CFuncPtr, list[int] | None, int, Any, Any, Any]]:
    """The calls of a step: per dtype variant, (function, the tensors' indices or None for all,
    their count, and the pointer, size and block-count arrays the function reads). Cached under
    a signature read with C-level maps (every address and size, the dtypes): from the second
    step of a training loop on, nothing is rebuilt (gradients that are new tensors each step
    make a new signature only if their addresses change)."""
    if lists[0] and type(lists[0][0]).__name__ == "DTensor":  # FSDP2: the local shards
        lists = [list(map(local, lst)) for lst in lists]
    signature = (kernel.name, *itertools.chain(*[map(Tensor.data_ptr, lst) for lst in lists],
                                               map(Tensor.numel, lists[0]), map(_DTYPE, lists[0]),
                                               map(_DTYPE, lists[2])))
    plan = _PLANS.get(signature)
    if plan is not None:
        _PLANS.move_to_end(signature)
        return plan
    fns = _libraries[kernel.name]
    calls: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, s) in enumerate(zip(lists[0], lists[2])):
        calls.setdefault((as_real(p).dtype, as_real(s).dtype), []).append(i)
    plan = []
    for key, idx in calls.items():
        ptrs = [t.data_ptr() for i in idx for t in (lst[i] for lst in lists)]
        numel = [as_real(lists[0][i]).numel() for i in idx]
        first = [0, *itertools.accumulate(-(-n // BLOCK) for n in numel)]
        plan.append((fns[key], None if len(calls) == 1 else idx, len(idx), (ctypes.c_void_p * len(ptrs))(*ptrs),
                     (ctypes.c_int64 * len(numel))(*numel), (ctypes.c_int64 * len(first))(*first)))
    _PLANS[signature] = plan
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def count(kernel: Kernel, steps: list[Tensor]) -> bool:
    """Add one to every step counter in one C call, where they are CPU float32 or float64
    tensors and ``kernel``'s library is loaded (``torch._foreach_add_`` on CPU scalars costs
    a few microseconds each). False, having changed nothing, where it does not apply."""
    fns = _libraries.get(kernel.name)
    if not steps or type(steps[0]).__name__ == "DTensor":
        return False
    dtypes = set(map(_DTYPE, steps))
    fn = fns.get(("count", next(iter(dtypes)))) if fns is not None and len(dtypes) == 1 else None
    if fn is None or set(map(_DEVICE_TYPE, steps)) != {"cpu"}:
        return False
    ptrs = list(map(Tensor.data_ptr, steps))
    fn(len(ptrs), (ctypes.c_void_p * len(ptrs))(*ptrs))
    return True


def run(kernel: Kernel, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
        scalars: list[float], per_tensor: Tensor | None = None, *, maximize: bool) -> None:
    """One fused pass of ``kernel`` over all the tensors, one call per dtype variant.

    ``states`` holds one list per state of the kernel; row ``i`` of ``per_tensor`` (float64, one
    column per value of ``kernel.per_tensor``) the values of tensor ``i``. The dispatcher
    (``_dispatch.route``) sends only tensors the kernel takes: on the CPU, a compiled dtype
    variant, and one dense layout shared by the parameter, its gradient and its states (so
    that the i-th element in memory is the same element in each).
    """
    n_threads = torch.get_num_threads()
    c_scalars = (ctypes.c_double * max(len(scalars), 1))(*scalars)
    for fn, idx, n, ptrs, numel, first in _plan(kernel, [params, grads, *states]):
        values = None
        if per_tensor is not None:
            values = (per_tensor if idx is None else per_tensor[idx]).contiguous()
        fn(n, ptrs, numel, first, c_scalars, None if values is None else values.data_ptr(), int(maximize), n_threads)
