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

* 8-bit states (Note [8-bit states] in _8bit.py) run csrc/8bit_loop.c, the
  same way (a :class:`Kernel` with ``codes``): its unit of work is a block of 256
  values of a row, decoded, updated and encoded again while it sits in the cache
  (the block's scale needs all its new values), one call per step and parameter dtype.

The C loops use the operations of the references, in their order, as torch's CPU
kernels compute them (``lerp`` and ``addcmul`` with one fused multiply-add each,
``sign`` with sign(0) = sign(nan) = 0, ``sqrt``), in the state's precision, and round
into bf16/fp16 parameters once: to nearest even as torch does, or stochastically
(Note [stochastic rounding] in _rounding.py; the random bits of an element are those of
its offset in memory, its index in a contiguous tensor). They are compiled with
``-ffp-contract=off`` (every rounding as written) and tested against the references at
every step: bit for bit where torch's float32 ``sqrt`` is correctly rounded (torch's
CPU ``sqrt`` is MKL's vector math where torch is built with it, which may be an ulp
off; tests/test_8bit_c.py). A division by a loop invariant (a bias correction, a gradient
scale) is done as Markstein's correction of a product by the reciprocal, which rounds as
the division does (``quotient`` in csrc/fused_prelude.h); the 8-bit codes need none (their
quotients are one per block, in the reference too).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import operator
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _rounding
from ._tensors import as_real, is_dtensor, local

__all__ = ["BLOCK", "QBLOCK", "Kernel", "library", "run", "source", "variants"]

log = logging.getLogger("optimizer")
BLOCK = 1 << 14  # elements a thread takes at a time
QBLOCK = _8bit.BLOCK  # values per scale of 8-bit states (Note [8-bit states]; QBLOCK in csrc/8bit_prelude.h)


@dataclass(frozen=True)
class Kernel:
    """An element-wise update in C. ``body`` reads and assigns the locals ``p`` (the
    parameter), ``g`` (the gradient, already negated when maximising) and one local per
    state, all of type ``T`` (the state's precision), and may read the ``scalars`` (the
    same for every tensor) and ``per_tensor`` values (one per tensor) by name.

    With ``codes`` (one per state: "signed" or "root", Note [8-bit states] in _8bit.py) the
    states are 8-bit codes with a float32 scale per block of 256 values of a row: the kernel
    runs in csrc/8bit_loop.c, its states decoded into float32 locals before ``body`` and
    encoded after it, a block at a time. "root" codes round stochastically with the seed
    ``mix32(step)`` (``_8bit.root_seed``): such a kernel has the per-tensor value ``step``."""

    name: str
    states: tuple[str, ...]
    scalars: tuple[str, ...]
    body: str
    per_tensor: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()

    @property
    def loop(self) -> str:
        """The C file of the loop that runs ``body`` (in csrc/)."""
        return "8bit_loop.c" if self.codes else "fused_loop.c"


# (parameter dtype, state dtype) -> the C storage types of parameter and state, and the compute type T
_C_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bf16", torch.float16: "f16"}
_VARIANTS: dict[tuple[torch.dtype, torch.dtype], tuple[str, str, str]] = {
    (torch.float64, torch.float64): ("double", "double", "double"),
    **{(p, s): (_C_TYPES[p], _C_TYPES[s], "float")
       for p in (torch.float32, torch.bfloat16, torch.float16) for s in (torch.float32, torch.bfloat16)},
}
# the 8-bit kernels: uint8 codes (and float32 scales), any of these parameter dtypes, float32 math
_VARIANTS_8BIT: dict[tuple[torch.dtype, torch.dtype], tuple[str, str, str]] = {
    (p, torch.uint8): (_C_TYPES[p], "u8", "float") for p in (torch.float32, torch.bfloat16, torch.float16)}


def variants(kernel: Kernel) -> dict[tuple[torch.dtype, torch.dtype], tuple[str, str, str]]:
    """The dtype variants compiled for ``kernel``: (parameter dtype, state dtype) -> C types."""
    return _VARIANTS_8BIT if kernel.codes else _VARIANTS


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
    """The C translation unit for ``kernel``: csrc/fused_prelude.h (and csrc/8bit_prelude.h
    for 8-bit states), the kernel's own macros, and its loop (csrc/fused_loop.c or
    csrc/8bit_loop.c) once per dtype variant (one function each). Compiled as it is printed."""
    loop = (_CSRC / kernel.loop).read_text()
    n = len(kernel.per_tensor)
    parts = [
        f"/* generated by optimizer._fused_cpu.source for the kernel {kernel.name!r} */\n#define BLOCK {BLOCK}\n",
        (_CSRC / "fused_prelude.h").read_text(),
        "\n" + (_CSRC / "8bit_prelude.h").read_text() if kernel.codes else "",
        f"\n/* the {kernel.name} kernel (written beside its Python reference) */\n",
        _macro("KERNEL_SCALARS", [f"const T {s} = (T)scalars[{j}];" for j, s in enumerate(kernel.scalars)]),
        _macro(
            "KERNEL_PER_TENSOR",
            [f"const T {s} = (T)per_tensor[t * {n} + {j}];" for j, s in enumerate(kernel.per_tensor)],
        ),
        _macro("KERNEL_BODY", [line.strip() for line in kernel.body.strip().splitlines()]),
    ]
    if kernel.codes:  # Note [8-bit states]: codes, then scales, per tensor; decoded, updated, encoded
        k = len(kernel.states)
        parts += [
            _macro(
                "KERNEL_STATES",
                [
                    line
                    for j, (s, code) in enumerate(zip(kernel.states, kernel.codes))
                    for line in (
                        f"uint8_t *restrict C_{s} = (uint8_t *)tp[{2 + j}] + base;",
                        f"float *restrict Z_{s} = (float *)tp[{2 + k + j}] + blk;",
                        f"const float unit_{s} = {code.upper()}_UNIT(*Z_{s});",
                        f"float buf_{s}[QBLOCK];",
                        f"uint32_t top_{s} = 0;",
                    )
                ],
            ),
            # decoded in a loop of their own (bytes to floats), into buf_<name>, which then holds the new
            # values; their block's largest magnitude is kept in top_<name> as they are written
            _macro(
                "KERNEL_DECODE",
                [
                    f"for (int i = 0; i < n; i++) buf_{s}[i] = decode_{code}(C_{s}[i], unit_{s});"
                    for s, code in zip(kernel.states, kernel.codes)
                ],
            ),
            _macro("KERNEL_LOAD", [f"T {s} = buf_{s}[i];" for s in kernel.states]),
            _macro("KERNEL_KEEP", [f"buf_{s}[i] = {s}; top_{s} = top_bits(top_{s}, {s});" for s in kernel.states]),
            # a second moment's codes round stochastically with the seed of the tensor's step
            _macro("KERNEL_ENCODE", [
                f"encode_{code}(buf_{s}, n, C_{s}, Z_{s}, scale_of_top(top_{s})"
                + (", mix32((uint32_t)step));" if code == "root" else ");")
                for s, code in zip(kernel.states, kernel.codes)]),
        ]
        n_ptrs = 2 + 2 * k
    else:
        parts += [
            _macro(
                "KERNEL_STATES", [f"STYPE *restrict S_{s} = (STYPE *)tp[{2 + j}];" for j, s in enumerate(kernel.states)]
            ),
            _macro("KERNEL_LOAD", [f"T {s} = CAT(load_, STYPE)(S_{s}[i]);" for s in kernel.states]),
            _macro("KERNEL_STORE", [f"S_{s}[i] = CAT(store_, STYPE)({s});" for s in kernel.states]),
        ]
        n_ptrs = 2 + len(kernel.states)
    body_only = loop[loop.index("*/") + 2:].lstrip("\n")  # the loop's header comment once, at the first variant
    for index, (ptype, stype, ctype) in enumerate(variants(kernel).values()):
        defines = {"FN": _function_name(kernel, ptype, stype), "T": ctype, "PTYPE": ptype, "STYPE": stype,
                   "N_PTRS": n_ptrs, "ROUNDS": int(ptype in ("bf16", "f16"))}
        parts += [
            f"\n/* parameters {ptype}, states {stype}, computed in {ctype} */\n",
            "#ifdef HAVE_F16\n" if ptype == "f16" else "",
            "".join(f"#define {name} {value}\n" for name, value in defines.items()),
            loop if index == 0 else body_only,
            "".join(f"#undef {name}\n" for name in defines),
            "#endif\n" if ptype == "f16" else "",
        ]
    return "".join(parts)


_libraries: dict[str, dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr]] = {}
_failed: list[str] = []
_warned: list[bool] = []
_lock = threading.Lock()
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # best first; the last is single-threaded
# every operation rounded as written (no contraction into fma but where the source says FMA), no
# errno; -fno-trapping-math (as torch's own CPU kernels are built) lets loops with a select be
# vectorised, and changes no result (floating-point traps are never enabled)
_CFLAGS = ("-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared")
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
            cmd = [*cc, *_CFLAGS, *flags, src, "-o", lib_path]
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
    for dtypes, (ptype, stype, _) in variants(kernel).items():
        fn = getattr(lib, _function_name(kernel, ptype, stype), None)  # no fp16 variant where C lacks _Float16
        if fn is not None:
            fn.restype = None
            fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
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


def _plan(
    kernel: Kernel, lists: list[list[Tensor]]
) -> list[tuple[ctypes._CFuncPtr, list[int] | None, int, Any, Any, Any]]:
    """The calls of a step: per dtype variant, (function, the tensors' indices or None for all,
    their count, and the pointer, size and block-count arrays the function reads). Cached under
    a signature read with C-level maps (every address and size, the dtypes): from the second
    step of a training loop on, nothing is rebuilt (gradients that are new tensors each step
    make a new signature only if their addresses change). For 8-bit states (``kernel.codes``)
    the sizes are the row lengths and the blocks are QBLOCK values of a row (Note [8-bit states])."""
    if lists[0] and is_dtensor(lists[0][0]):  # FSDP2: the local shards
        lists = [list(map(local, lst)) for lst in lists]
    signature = (kernel.name, *itertools.chain(*[map(Tensor.data_ptr, lst) for lst in lists],
                                               map(Tensor.numel, lists[0]), map(_DTYPE, lists[0]),
                                               map(_DTYPE, lists[2]), map(len, lists[0]) if kernel.codes else ()))
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
        if kernel.codes:  # per tensor: its row length, and rows x ceil(cols / QBLOCK) blocks
            rows = [len(lists[0][i]) for i in idx]
            sizes = [lists[0][i].numel() // r if r else 0 for i, r in zip(idx, rows)]
            blocks = [r * -(-c // QBLOCK) for r, c in zip(rows, sizes)]
        else:
            sizes = [as_real(lists[0][i]).numel() for i in idx]
            blocks = [-(-n // BLOCK) for n in sizes]
        first = [0, *itertools.accumulate(blocks)]
        plan.append((fns[key], None if len(calls) == 1 else idx, len(idx), (ctypes.c_void_p * len(ptrs))(*ptrs),
                     (ctypes.c_int64 * len(sizes))(*sizes), (ctypes.c_int64 * len(first))(*first)))
    _PLANS[signature] = plan
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def count(kernel: Kernel, steps: list[Tensor]) -> bool:
    """Add one to every step counter in one C call, where they are CPU float32 or float64
    tensors and ``kernel``'s library is loaded (``torch._foreach_add_`` on CPU scalars costs
    a few microseconds each). False, having changed nothing, where it does not apply."""
    fns = _libraries.get(kernel.name)
    if not steps or is_dtensor(steps[0]):
        return False
    dtypes = set(map(_DTYPE, steps))
    fn = fns.get(("count", next(iter(dtypes)))) if fns is not None and len(dtypes) == 1 else None
    if fn is None or set(map(_DEVICE_TYPE, steps)) != {"cpu"}:
        return False
    ptrs = list(map(Tensor.data_ptr, steps))
    fn(len(ptrs), (ctypes.c_void_p * len(ptrs))(*ptrs))
    return True


def run(kernel: Kernel, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
        scalars: list[float], per_tensor: Sequence[Sequence[float]] | None = None, *, maximize: bool,
        rounding_seeds: Sequence[int] | None = None) -> None:
    """One fused pass of ``kernel`` over all the tensors, one call per dtype variant.

    ``states`` holds one list per state of the kernel (for 8-bit states: the codes of each
    state, then the scales of each); ``per_tensor[i]`` the values of tensor ``i``, one per name
    in ``kernel.per_tensor``; ``rounding_seeds`` one 32-bit seed per tensor, to round bf16/fp16
    parameters stochastically (Note [stochastic rounding]), or None to round them to nearest.
    The dispatcher (``_dispatch.route``) sends only tensors the kernel takes: on the CPU, a
    compiled dtype variant, and one dense layout shared by the parameter, its gradient and its
    states (so that the i-th element in memory is the same element in each; 8-bit states:
    contiguous tensors). The random bits of element i are those of its offset in memory.
    """
    n_threads = torch.get_num_threads()
    c_scalars = (ctypes.c_double * max(len(scalars), 1))(*scalars)
    width = len(kernel.per_tensor)
    for fn, idx, n, ptrs, sizes, first in _plan(kernel, [params, grads, *states]):
        values = seeds = None
        if width:
            rows = per_tensor if idx is None else [per_tensor[i] for i in idx]
            values = (ctypes.c_double * (n * width))(*itertools.chain.from_iterable(rows))
        if rounding_seeds is not None and params[0 if idx is None else idx[0]].dtype in _rounding.ROUNDED:
            seeds = (ctypes.c_uint32 * n)(*(rounding_seeds if idx is None else [rounding_seeds[i] for i in idx]))
        fn(n, ptrs, sizes, first, c_scalars, values, int(maximize), seeds, n_threads)
