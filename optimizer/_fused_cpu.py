"""Fused CPU backends: each element is read and written once, one call per step.

Note [fused CPU]
~~~~~~~~~~~~~~~~
An optimizer step does almost no arithmetic per byte it moves, so its speed is
memory bandwidth. The reference and foreach paths make one pass over memory per
operation (about 6 for Lion, 9 for AdamW); a fused kernel makes one.

* AdamW with float32/float64 parameters and ``correct_bias=True`` is exactly
  torch's update, so it runs torch's own fused CPU kernel
  (``torch._fused_adamw_``): nothing to compile.
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
import itertools
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

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

_PRELUDE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

/* Compiled with -ffp-contract=off: every operation rounds as the reference's torch ops do;
   a fused multiply-add only where torch's vectorised CPU kernels use one (lerp). */
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
#define FMA(a, b, c) _Generic((a), float: fmaf, default: fma)(a, b, c)
#else
#define FMA(a, b, c) ((a) * (b) + (c))   /* no fast fma here: a call per element would be slow */
#endif
/* torch's lerp: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start) */
#define LERP(a, b, w) ((w) < 0.5 ? FMA((w), (b) - (a), (a)) : FMA((w) - 1, (b) - (a), (b)))
#define SIGN(x) ((T)(((x) > 0) - ((x) < 0)))   /* torch.sign: 0 at 0 and at nan */
#define SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x)

static inline float load_float(float x) { return x; }
static inline float store_float(float x) { return x; }
static inline double load_double(double x) { return x; }
static inline double store_double(double x) { return x; }

typedef uint16_t bf16;   /* the upper half of a float32 */
static inline float load_bf16(bf16 x) {
    union { uint32_t u; float f; } v; v.u = (uint32_t)x << 16; return v.f;
}
static inline bf16 store_bf16(float x) {   /* round to nearest even, nan stays nan */
    union { uint32_t u; float f; } v; v.f = x;
    return x != x ? (bf16)0x7fc0 : (bf16)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

#ifdef __FLT16_MAX__
#define HAVE_F16 1
typedef _Float16 f16;
static inline float load_f16(f16 x) { return (float)x; }
static inline f16 store_f16(float x) { return (f16)x; }
#endif

/* the tensor holding block b: first[t] <= b < first[t + 1], first[] the running block counts */
static inline int64_t tensor_of(int64_t b, const int64_t *first, int64_t n_tensors) {
    int64_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) { int64_t mid = (lo + hi + 1) / 2; if (first[mid] <= b) lo = mid; else hi = mid - 1; }
    return lo;
}
"""

# One function per kernel and dtype variant. ptrs holds, per tensor, the parameter, the
# gradient and the states; first[] the running count of blocks (n_tensors + 1 entries).
_LOOP = r"""
{guard_open}
void {fn}(int64_t n_tensors, void *const *ptrs, const int64_t *numel, const int64_t *first,
         const double *scalars, const double *per_tensor, int maximize, int n_threads) {{
    typedef {ctype} T;
{scalar_decls}
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < first[n_tensors]; b++) {{
        const int64_t t = tensor_of(b, first, n_tensors), lo = (b - first[t]) * BLOCK;
        const int64_t hi = lo + BLOCK < numel[t] ? lo + BLOCK : numel[t];
        void *const *tp = ptrs + t * {n_ptrs};
        {ptype} *restrict P = ({ptype} *)tp[0];
        const {ptype} *restrict G = (const {ptype} *)tp[1];
{state_ptrs}
{per_tensor_decls}
        for (int64_t i = lo; i < hi; i++) {{
            T p = load_{ptype}(P[i]);
            T g = load_{ptype}(G[i]);
            if (maximize) g = -g;
{state_loads}
{body}
            P[i] = store_{ptype}(p);
{state_stores}
        }}
    }}
}}
{guard_close}
"""


def _function_name(kernel: Kernel, ptype: str, stype: str) -> str:
    return f"{kernel.name}_{ptype}_{stype}"


def source(kernel: Kernel) -> str:
    """The C translation unit for ``kernel``: one function per dtype variant."""
    parts = [f"#define BLOCK {BLOCK}\n", _PRELUDE]
    for ptype, stype, ctype in _VARIANTS.values():
        ind = " " * 8
        parts.append(_LOOP.format(
            guard_open="#ifdef HAVE_F16" if ptype == "f16" else "",
            guard_close="#endif" if ptype == "f16" else "",
            fn=_function_name(kernel, ptype, stype),
            ctype=ctype,
            ptype=ptype,
            n_ptrs=2 + len(kernel.states),
            scalar_decls="\n".join(f"    const T {s} = (T)scalars[{j}];" for j, s in enumerate(kernel.scalars)),
            state_ptrs="\n".join(f"{ind}{stype} *restrict S_{s} = ({stype} *)tp[{2 + j}];"
                                  for j, s in enumerate(kernel.states)),
            per_tensor_decls="\n".join(f"{ind}const T {s} = (T)per_tensor[t * {len(kernel.per_tensor)} + {j}];"
                                       for j, s in enumerate(kernel.per_tensor)),
            state_loads="\n".join(f"{ind}    T {s} = load_{stype}(S_{s}[i]);" for s in kernel.states),
            body="\n".join(f"{ind}    {line.strip()}" for line in kernel.body.strip().splitlines()),
            state_stores="\n".join(f"{ind}    S_{s}[i] = store_{stype}({s});" for s in kernel.states),
        ))
    return "".join(parts)


_libraries: dict[str, dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr]] = {}
_failed: list[str] = []
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
    return fns, " ".join(flags) or "single-threaded"


def library(kernel: Kernel, *, strict: bool) -> dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr] | None:
    """The compiled variants of ``kernel`` by (parameter dtype, state dtype), compiling them now
    if needed; None (after one warning per process) where that is impossible, or RuntimeError
    if ``strict`` (``fused=True``). Called while a step is being checked, before anything changes."""
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
                if not strict:
                    warnings.warn(
                        f"optimizer: the fused CPU kernels cannot be compiled here ({_failed[0]}); "
                        "using the foreach path instead (correct, slower). Install a C compiler to enable them.",
                        RuntimeWarning,
                        stacklevel=6,
                    )
            else:
                log.info("optimizer: compiled the fused CPU kernel %s (%s) in %.2f s (once per process)",
                         kernel.name, how, time.perf_counter() - start)
        if _failed:
            if strict:
                raise RuntimeError(f"fused=True: the fused CPU kernels cannot be compiled here ({_failed[0]})")
            return None
        return _libraries[kernel.name]


def run(kernel: Kernel, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
        scalars: list[float], per_tensor: list[list[float]] | None = None, *, maximize: bool) -> None:
    """One fused pass of ``kernel`` over all the tensors, one call per dtype variant.

    ``states`` holds one list per state of the kernel; ``per_tensor[i]`` the per-tensor values of
    tensor ``i``. The dispatcher (``_dispatch.route``) sends only tensors the kernel takes: on
    the CPU, a compiled dtype variant, and one dense layout shared by the parameter, its
    gradient and its states (so that the i-th element in memory is the same element in each).
    """
    fns = _libraries[kernel.name]
    calls: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        calls.setdefault((as_real(local(p)).dtype, as_real(local(states[0][i])).dtype), []).append(i)
    n_threads = torch.get_num_threads()
    c_scalars = (ctypes.c_double * max(len(scalars), 1))(*scalars)
    for key, idx in calls.items():
        ptrs = [local(t).data_ptr() for i in idx for t in (params[i], grads[i], *(s[i] for s in states))]
        numel = [as_real(local(params[i])).numel() for i in idx]
        first = [0, *itertools.accumulate(-(-n // BLOCK) for n in numel)]
        values = [x for i in idx for x in per_tensor[i]] if per_tensor is not None else []
        fns[key](len(idx), (ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_int64 * len(numel))(*numel),
                 (ctypes.c_int64 * len(first))(*first), c_scalars, (ctypes.c_double * max(len(values), 1))(*values),
                 int(maximize), n_threads)
