"""Which backend updates which tensors: the one module that knows the backends and the
devices they serve.

Note [backends]
~~~~~~~~~~~~~~~
Every algorithm has the same backends, each a function with the algorithm's one
signature (``_single_tensor_adamw``, ``_multi_tensor_adamw``, ...):

* ``reference``: a loop over tensors, one line per equation: the spec. Takes anything.
* ``foreach``: ``torch._foreach_*`` ops, one launch per equation for many tensors.
  Takes anything (any device, layout or dtype).
* ``c``: one C loop over all tensors of a step (Note [fused CPU]). CPU tensors whose
  parameter, gradient and states share one dense layout, in a dtype pair it was built for.
* ``torch``: torch's own fused CPU kernel, where it computes exactly our update
  (AdamW with ``correct_bias``, float32/float64 parameters and state of the same dtype),
  under the same layout condition.
* ``triton``: one Triton launch per group and dtype pair (Note [fused GPU]). CUDA tensors
  under the same layout condition, fp32/bf16/fp16 parameters with fp32/bf16 state, and
  step counters on the parameter's GPU.

``foreach`` and ``fused`` (each True, False or None) choose for a whole group
(:func:`group_backend`): ``fused`` sends each tensor to the first fused kernel that
takes it (``triton`` on CUDA; ``torch``, then ``c`` on the CPU) and the rest to
``foreach``; an algorithm without fused kernels (Muon, whose work is matrix products:
``Backends.fused_kernels``) runs ``foreach`` there, its fastest path. :func:`route`
does this for a step, and is phase 1 of the step (Note [two-phase step]): everything
that can fail does so here, before anything changed (compiling the C loop, importing
Triton, a ``fused=True`` that cannot be met). Then :func:`run` calls each backend on its
tensors.

Under ``torch.compile`` (:func:`step`), ``foreach`` and ``reference`` are traced into
the graph; the fused kernels run outside it, as torch keeps its own fused step out
of tracing: Dynamo cannot see into a C loop or a Triton launch table.

Note [step counters]
~~~~~~~~~~~~~~~~~~~~
AdamW's per-parameter step counts move in one place, :func:`count`: +1 for every
tensor of the step before any backend runs (so each backend reads ``t``, this
step's number, as torch's fused kernels do; CPU counters in one C call, where
``torch._foreach_add_`` would spend microseconds on each), and back by 1 where the Triton
kernels skipped the step on the device (GradScaler's ``found_inf`` not 0: it is the sum of
one flag per device, so 2.0 when two GPUs overflowed). A step skipped on the host
(``found_inf`` read there) counts nothing.

Note [update formulas]
~~~~~~~~~~~~~~~~~~~~~~
Each update is written in four places; each is tied to the reference at every step
of a multi-step run by a test, and the reference to a float64 transcription of the
paper (``tests/optim_table.py``) by ``test_reference_matches_float64_formula``:

=========  =================================================  =========================================
backend    where                                              test (tests/...)
=========  =================================================  =========================================
reference  ``_single_tensor_<algo>`` in adamw.py, lion.py      test_numerics: reference_matches_float64_formula
foreach    ``_multi_tensor_<algo>`` beside it                  test_numerics: backend_matches_reference_every_step
c          ``_<ALGO>_KERNEL.body`` beside it (C, the loop in   test_fused_cpu: fused_matches_reference_every_step...
           csrc/fused_loop.c)                                  test_c_source: compiles with -Werror
torch      ``torch._fused_adamw_`` (AdamW, ``correct_bias``)   test_fused_cpu: adamw_fused_default_is_torchs_kernel...
triton     ``_adamw_kernel``, ``_lion_kernel`` in              test_fused_triton: kernel_matches_reference_every_step
           _fused_triton.py                                    (Triton's interpreter on CPU; CUDA where present)
=========  =================================================  =========================================

8-bit states (Note [8-bit states] in _8bit.py) have their own backends, with the same rows:
``_single_tensor_adamw8bit``/``_lion8bit`` (the references, in adamw.py, lion.py, tied to
a float64 transcription by test_8bit), their C bodies beside them (test_8bit_c) and the
``adamw8bit``/``lion8bit`` Triton kernels (test_8bit_triton); the foreach path takes the reference.
Stochastic rounding (Note [stochastic rounding]) is done by the reference, the C loops and the
Triton kernels (``Backends.rounding``), against ``_rounding.round_stochastic`` in the same tests.
"""

from __future__ import annotations

import importlib
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _fused_cpu, _rounding
from ._tensors import (
    PARAM_DTYPES,
    Meta,
    amp_grads,
    as_real,
    device_types,
    first_sharing_memory,
    group_by_device_and_dtype,
    is_dtensor,
    local,
    pick,
    same_dense_layout,
)

__all__ = ["Backends", "TRITON_DEVICES", "check_lists", "check_own_memory", "count", "group_backend", "import_kernels",
           "load_triton", "route", "run", "step"]

Routes = dict[str, list[int]]  # backend name -> indices into the step's lists


@dataclass(frozen=True)
class Backends:
    """One algorithm's backends (Note [backends]), all with the algorithm's signature:
    ``(params, grads, *states, *counters, **hyper)``."""

    names: tuple[str, ...]  # of the parallel lists, as the functional entry calls them
    reference: Callable[..., None]
    foreach: Callable[..., None]
    n_states: int  # state lists after params and grads; counters (AdamW's steps) follow
    # the fused kernels; None for an algorithm without them (Muon: matrix products, which no
    # element-wise loop fuses), whose fused=True and default run ``foreach`` (Note [backends])
    c: Callable[..., None] | None = None  # runs c_kernel through _fused_cpu.run
    c_kernel: _fused_cpu.Kernel | None = None
    triton: str | None = None  # the name of the algorithm's function in _fused_triton
    torch: Callable[..., None] | None = None  # torch's own fused kernel, where it computes our update
    torch_applies: Callable[[dict[str, Any]], bool] = lambda hyper: False
    # 8-bit states (Note [8-bit states]): codes and their block scales, routed whole (:func:`_8bit_kernel`)
    eight_bit: bool = False
    # the backends that round bf16/fp16 parameters stochastically (Note [stochastic rounding]);
    # such parameters go to the reference elsewhere when ``rounding_seeds`` is given
    rounding: frozenset[str] = frozenset({"reference"})

    @property
    def fused_kernels(self) -> bool:
        """Whether the algorithm has fused kernels; without them ``fused`` means ``foreach``."""
        return self.c is not None or self.triton is not None


# device types whose tensors the fused backends send to the Triton kernels; the tests add
# "cpu" to run them through Triton's interpreter (TRITON_INTERPRET=1)
TRITON_DEVICES = {"cuda"}
_kernel_modules: dict[str, tuple[Any, str]] = {}  # module name -> (the module or None, why not)


def load_triton(strict: bool) -> Any:
    """The fused GPU kernels (``_fused_triton``), or None: :func:`import_kernels`."""
    return import_kernels("_fused_triton", strict, "the fused GPU kernels", "the foreach path", "foreach=True")


def import_kernels(module: str, strict: bool, what: str, otherwise: str, remedy: str) -> Any:
    """``optimizer.<module>``, Triton kernels, imported on first use (``import optimizer`` needs
    only torch), or None after one warning where Triton cannot be imported; an explicit
    ``fused=True`` (``strict``) raises instead. ``what`` names the kernels in the messages,
    ``otherwise`` the path taken without them, ``remedy`` the option that avoids them."""
    if module not in _kernel_modules:
        try:
            _kernel_modules[module] = (importlib.import_module(f".{module}", __package__), "")
        except Exception as err:  # noqa: BLE001 - no triton, or one that cannot initialise here
            _kernel_modules[module] = (None, f"{type(err).__name__}: {err}")
            if not strict:
                warnings.warn(f"optimizer: {what} need Triton, which cannot be imported here "
                              f"({_kernel_modules[module][1]}); using {otherwise} instead (correct, slower). "
                              "pip install triton", RuntimeWarning, stacklevel=7)
    kernels, error = _kernel_modules[module]
    if kernels is None and strict:
        raise RuntimeError(f"fused=True: {what} need Triton ({error}); pip install triton, or pass {remedy}")
    return kernels


def group_backend(devices: set[str], foreach: bool | None, fused: bool | None) -> str:
    """The backend of a group: "fused", "foreach" or "reference".

    ``None`` means "choose for me"; the choice is the fastest correct path:

    * CPU and CUDA: the fused kernels (``python -m optimizer bench`` times them against
      torch's fused AdamW, docs/benchmarks.md). Without a C compiler, or without
      Triton, they fall back to foreach with one warning.
    * CUDA with ``fused=False``: foreach, one kernel launch per operation instead
      of one per tensor and operation.
    * elsewhere, or CPU with ``fused=False``: the per-tensor loop, which on a CPU
      runs about as fast as foreach for AdamW (both are bound by memory) and holds
      temporaries for one tensor at a time rather than for the whole model.

    An explicit ``fused=True`` on other devices raises rather than falling back.
    """
    if fused and foreach:
        raise ValueError("Invalid backend: foreach=True and fused=True; choose one")
    served = {"cpu", "cuda"} | TRITON_DEVICES
    if fused:
        if devices - served:
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported devices "
                f"(cpu, cuda); got parameters on {sorted(devices - served)}: use foreach=True there"
            )
        return "fused"
    if foreach:
        return "foreach"
    if foreach is None and fused is None and devices <= served:
        return "fused"
    if foreach is None and devices == {"cuda"}:
        return "foreach"
    return "reference"


_DTYPE = operator.attrgetter("dtype")
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def route(backends: Backends, lists: list[list[Tensor]], hyper: dict[str, Any], *,
          foreach: bool | None, fused: bool | None) -> Routes:
    """Phase 1 of a step (Note [backends]): which backend updates which of the tensors.
    Raises, before anything has changed, where ``fused=True`` cannot be met, or where stochastic
    rounding would be captured in a CUDA graph (Note [stochastic rounding])."""
    rounding = hyper.get("rounding_seeds") is not None
    if rounding and _rounding.capturing() and any(p.dtype in _rounding.ROUNDED for p in lists[0]):
        raise RuntimeError("stochastic rounding cannot be captured in a CUDA graph: its seeds are made on the host "
                           "at each step, so every replay would round with the same bits; capture the step without "
                           "stochastic_rounding (or rounding_seeds), or run it outside the graph")
    routes = _route(backends, lists, hyper, foreach=foreach, fused=fused)
    if not rounding:
        return routes
    # stochastic rounding: bf16/fp16 parameters only to the backends that do it, and to the fused
    # ones only if contiguous (their random bits follow memory, the reference's the logical order)
    params, moved = lists[0], []
    for name in [name for name in routes if name != "reference"]:
        def elsewhere(i: int) -> bool:
            return params[i].dtype in _rounding.ROUNDED and (
                name not in backends.rounding or not params[i].is_contiguous()
            )

        now = [i for i in routes[name] if elsewhere(i)]
        _warn_slow_rounding(name, backends, [params[i] for i in now])
        moved += now
        routes[name] = [i for i in routes[name] if not elsewhere(i)]
    if moved:
        routes["reference"] = sorted(routes.get("reference", []) + moved)
    return {name: idx for name, idx in routes.items() if idx}


_warned_slow_rounding = False


def _warn_slow_rounding(backend: str, backends: Backends, moved: list[Tensor]) -> None:
    """One warning per process when stochastically rounded parameters off the CPU leave their
    backend for the reference: it reads each tensor's step count on the host, one device sync per
    tensor, a slowdown a user could not otherwise see (on the CPU it costs no sync)."""
    global _warned_slow_rounding
    off_cpu = [p for p in moved if p.device.type != "cpu"]
    if _warned_slow_rounding or not off_cpu:
        return
    _warned_slow_rounding = True
    p = off_cpu[0]
    if backend in backends.rounding:
        why = (f"it is not contiguous (shape {tuple(p.shape)}, strides {p.stride()}), and the {backend} kernels' "
               "random bits follow memory order; .contiguous() parameters avoid it")
    else:
        why = f"the {backend} backend does not round stochastically; the default backend (fused) does"
    warnings.warn(f"optimizer: {len(off_cpu)} {p.dtype} parameter(s) with stochastic rounding on {p.device} run "
                  f"the reference, a tensor at a time (AdamW's reads each step count on the host: a device sync "
                  f"per tensor): {why}. This warning is shown once.",
                  RuntimeWarning, stacklevel=6)



def _route(backends: Backends, lists: list[list[Tensor]], hyper: dict[str, Any], *,
           foreach: bool | None, fused: bool | None) -> Routes:
    params = lists[0]
    n = len(params)
    everything = list(range(n))
    backend = group_backend(device_types(params), foreach, fused)
    if backend == "fused" and not backends.fused_kernels:
        backend = "foreach"
    if backend != "fused" or not n:
        return {backend: everything}
    if backends.eight_bit:
        return {_8bit_kernel(backends, lists, strict=bool(fused)): everything}
    strict = bool(fused)
    tensors = lists[:2 + backends.n_states]  # parameter, gradient, states (shaped like the parameter)
    counters = lists[2 + backends.n_states:]  # AdamW's step counts
    if is_dtensor(params[0]):  # FSDP2: the kernels update the local shards
        tensors = [list(map(local, lst)) for lst in tensors]
        counters = [list(map(local, lst)) for lst in counters]

    pdts = list(map(_DTYPE, tensors[0]))
    sdts = list(map(_DTYPE, tensors[2])) if backends.n_states else pdts
    uniform = (list(map(_DTYPE, tensors[1])) == pdts and all(list(map(_DTYPE, lst)) == sdts for lst in tensors[3:])
               and all(all(map(Tensor.is_contiguous, lst)) for lst in tensors))
    devices = device_types(tensors[0])
    if uniform and len(devices) == 1 and len(set(pdts)) == 1 and len(set(sdts)) == 1:  # the usual step
        device = next(iter(devices))
        counters_ok = device not in TRITON_DEVICES or _counters_on(tensors[0], counters)
        return {fused_kernel(backends, hyper, device, pdts[0], sdts[0], True, counters_ok, strict=strict): everything}

    # otherwise one decision per kind of tensor: (device type, dtypes, layout ok, counters ok)
    if uniform:
        kinds = [(p.device.type, pdt, sdt, True) for p, pdt, sdt in zip(tensors[0], pdts, sdts)]
    else:
        kinds = []
        for ts in zip(*tensors):
            same = all(t.dtype == ts[0].dtype for t in ts[1:2]) and all(t.dtype == ts[2].dtype for t in ts[3:])
            kinds.append((ts[0].device.type, ts[0].dtype, ts[2].dtype if len(ts) > 2 else ts[0].dtype,
                          same and same_dense_layout(tuple(as_real(t) for t in ts))))
    counters_ok = [_counters_on([p], [[c] for c in cs]) for p, *cs in zip(tensors[0], *counters)]
    routes: Routes = {}
    chosen: dict[tuple[Any, ...], str] = {}
    for i, kind in enumerate(kinds):
        key = (*kind, not counters or counters_ok[i])
        if key not in chosen:
            chosen[key] = fused_kernel(backends, hyper, *key, strict=strict)
        routes.setdefault(chosen[key], []).append(i)
    return routes


def _8bit_kernel(backends: Backends, lists: list[list[Tensor]], *, strict: bool) -> str:
    """The fused kernel for 8-bit states (Note [8-bit states]): the C loop on the CPU, Triton on
    CUDA, for contiguous tensors of one device; else the foreach path (AdamW's and Lion's is
    their reference; Muon's batches its matrix products)."""
    tensors = lists[:2 + backends.n_states]
    counters = lists[2 + backends.n_states:]
    if is_dtensor(tensors[0][0]):
        tensors = [list(map(local, lst)) for lst in tensors]
        counters = [list(map(local, lst)) for lst in counters]
    devices = device_types(tensors[0])
    ok = len(devices) == 1 and all(all(map(Tensor.is_contiguous, lst)) for lst in tensors)
    device = next(iter(devices))
    if device in TRITON_DEVICES:
        kernels = load_triton(strict)
        if (kernels is not None and backends.triton is not None and hasattr(kernels, backends.triton) and ok
                and _counters_on(tensors[0], counters)):
            return "triton"
    elif device == "cpu" and ok and backends.c_kernel is not None:
        fns = _fused_cpu.library(backends.c_kernel, strict=strict)
        if fns is not None:
            return "c"
    return "foreach" if backends.foreach is not None else "reference"


def _counters_on(params: list[Tensor], counters: list[list[Tensor]]) -> bool:
    """The step counters are float32 scalars on their parameter's device (the Triton kernel reads them there)."""
    devices = list(map(operator.attrgetter("device"), params))
    return all(set(map(_DTYPE, lst)) <= {torch.float32} and set(map(Tensor.numel, lst)) <= {1}
               and list(map(operator.attrgetter("device"), lst)) == devices for lst in counters)


def fused_kernel(backends: Backends, hyper: dict[str, Any], device: str, pdt: torch.dtype, sdt: torch.dtype,
                  layout_ok: bool, counters_ok: bool, *, strict: bool) -> str:
    """The fused kernel for one kind of tensor, else "foreach"."""
    if device in TRITON_DEVICES:  # real dtypes only: the launch tables count elements, not reals
        kernels = load_triton(strict)
        ok = kernels is not None and (pdt, sdt) in kernels.SUPPORTED and layout_ok and counters_ok
        return "triton" if ok else "foreach"
    if device != "cpu":
        return "foreach"
    pdt, sdt = _REAL.get(pdt, pdt), _REAL.get(sdt, sdt)  # the CPU kernels see complex tensors as reals
    if (backends.torch is not None and backends.torch_applies(hyper) and pdt in (torch.float32, torch.float64)
            and sdt == pdt and layout_ok):
        _fused_cpu.library(backends.c_kernel, strict=False, warn=False)  # for its step counting (count)
        return "torch"
    if layout_ok:
        fns = _fused_cpu.library(backends.c_kernel, strict=strict)
        if fns is not None and (pdt, sdt) in fns:
            return "c"
    return "foreach"


def run(backends: Backends, routes: Routes, lists: list[list[Tensor]], hyper: dict[str, Any], *,
        grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Phase 2 of a step: each backend updates its tensors. The Triton kernels apply
    GradScaler's ``grad_scale``/``found_inf`` on the device (Note [fused GPU]); the others
    get unscaled gradients, or nothing to do when ``found_inf`` is set (Note [GradScaler])."""
    n = len(lists[0])

    def part(idx: list[int]) -> list[list[Tensor]]:
        return lists if len(idx) == n else pick(lists, idx)

    seeds = hyper.get("rounding_seeds")

    def hyper_of(name: str, idx: list[int]) -> dict[str, Any]:
        """The keyword arguments of one backend: each tensor's rounding seed where it rounds."""
        if seeds is None:
            return hyper
        if name not in backends.rounding:
            return {k: v for k, v in hyper.items() if k != "rounding_seeds"}
        return {**hyper, "rounding_seeds": [seeds[i] for i in idx]}

    host = [(name, idx) for name, idx in routes.items() if name != "triton" and idx]
    if found_inf is not None and host:  # read on the host (one sync, as GradScaler's own path)
        if float(found_inf) != 0:  # inf/nan in the gradients: skip the step, count nothing
            return
        found_inf = None
    counters = lists[2 + backends.n_states:]
    count(backends, counters)
    if routes.get("triton"):
        getattr(load_triton(False), backends.triton)(*part(routes["triton"]), **hyper_of("triton", routes["triton"]),
                                                     grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:  # the kernels skipped on the device: take the count back there
            count(backends, counters, found_inf)
    for name, idx in host:
        sub = part(idx)
        if grad_scale is not None:
            sub = [sub[0], amp_grads(sub[1], grad_scale, None), *sub[2:]]
        getattr(backends, name)(*sub, **hyper_of(name, idx))


def count(backends: Backends, counters: list[list[Tensor]], skipped: Tensor | None = None) -> None:
    """The one place where step counters move (Note [step counters]): +1 before the backends
    run (CPU counters in one C call where the C loop is built), or back by 1 where GradScaler's
    ``found_inf`` is not 0 (the fused kernels skipped the step on the device; read there, no sync)."""
    if skipped is not None:
        # 1 or 0, not found_inf itself: GradScaler sums its flags over the devices that hold the
        # parameters, so it is 2.0 when two GPUs overflowed (the kernels skip on != 0 too)
        skipped = (skipped != 0).to(torch.float32)
    for steps in counters:
        if skipped is None:
            if torch.compiler.is_compiling() or not _fused_cpu.count(backends.c_kernel, steps):
                torch._foreach_add_(steps, 1.0)
        else:
            for (device, _), (group,) in group_by_device_and_dtype(steps).items():
                flag = skipped.to(device=device, non_blocking=True)
                torch._foreach_sub_(group, [flag] * len(group))


def step(backends: Backends, lists: list[list[Tensor]], hyper: dict[str, Any], *, foreach: bool | None,
         fused: bool | None, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
         routes: Routes | None = None) -> None:
    """One step of an algorithm over parallel lists: route (unless the caller already did, in
    its phase 1) and run. Under ``torch.compile``, see :func:`_traced_step`."""
    if torch.compiler.is_compiling():
        _traced_step(backends, lists, hyper, foreach=foreach, fused=fused, grad_scale=grad_scale,
                     found_inf=found_inf)
        return
    if routes is None:  # the functional entry: its phase 1 here
        check_lists(backends, lists)
        routes = route(backends, lists, hyper, foreach=foreach, fused=fused)
    run(backends, routes, lists, hyper, grad_scale=grad_scale, found_inf=found_inf)


def check_lists(backends: Backends, lists: list[list[Tensor]]) -> None:
    """Phase 1 of the functional entries (``adamw()``, ``lion()``): the lists fit each other
    (lengths; gradients and states of each parameter's shape and device; dtypes the kernels
    can take; parameters and states that can be written in place, :func:`check_own_memory`),
    so that no backend fails midway or reads past a tensor. The optimizer classes
    check all this, and more, before they call a backend."""
    params = lists[0]
    for name, lst in zip(backends.names, lists):
        if len(lst) != len(params):
            raise ValueError(f"Invalid {name}: {len(lst)} tensors for {len(params)} params")
    meta = Meta(params)
    bad = meta.bad_dtype()
    if bad is not None:
        raise ValueError(f"Invalid params[{bad}]: dtype {params[bad].dtype} (float16, bfloat16, float32, float64 "
                         "or complex)")
    n = 2 + backends.n_states
    for name, lst in zip(backends.names[1:n], lists[1:n]):
        dtypes = meta.dtypes if name == backends.names[1] else list(map(_DTYPE, lst))
        ok = all(isinstance(t, Tensor) and t.layout == torch.strided for t in lst) and meta.same(lst, dtypes=dtypes)
        ok = ok and all(d in PARAM_DTYPES and d.is_complex == p.is_complex for d, p in zip(dtypes, meta.dtypes))
        if not ok:
            for i, (p, t) in enumerate(zip(params, lst)):
                if not (
                    isinstance(t, Tensor)
                    and t.layout == torch.strided
                    and t.shape == p.shape
                    and t.device == p.device
                    and (
                        t.dtype == p.dtype
                        if name == backends.names[1]
                        else t.dtype in PARAM_DTYPES and t.dtype.is_complex == p.is_complex()
                    )
                ):
                    got = (
                        f"{t.layout} {t.dtype} of shape {tuple(t.shape)} on {t.device}"
                        if isinstance(t, Tensor)
                        else repr(t)
                    )
                    raise ValueError(f"Invalid {name}[{i}]: {got}, for a parameter {p.dtype} of shape "
                                     f"{tuple(p.shape)} on {p.device}")
    for name, lst in zip(backends.names[n:], lists[n:]):
        for i, t in enumerate(lst):
            if not (isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point()):
                raise ValueError(f"Invalid {name}[{i}]: {t!r} (a one-element float tensor)")
    check_own_memory([(backends.names[0], params), *zip(backends.names[2:n], lists[2:n])])


def check_own_memory(named_lists: list[tuple[str, list[Tensor]]]) -> None:
    """The lists a step writes in place (parameters, states) hold no tensor with two elements in one
    place (an expanded tensor): torch refuses to write one, midway through the step."""
    for name, lst in named_lists:
        bad = first_sharing_memory(lst)
        if bad is not None:
            raise ValueError(f"Invalid {name}[{bad}]: its elements share memory (strides "
                             f"{tuple(local(lst[bad]).stride())}: an expanded tensor?), and a step writes each "
                             "element in place; give it memory of its own")


def _traced_step(backends: Backends, lists: list[list[Tensor]], hyper: dict[str, Any], *, foreach: bool | None,
                 fused: bool | None, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """What ``torch.compile`` traces: the foreach or reference backend in the graph, the fused
    kernels outside it (one graph break, as torch's ``fused=True``)."""
    backend = group_backend({p.device.type for p in lists[0]}, foreach, fused)
    if backend == "fused" and not backends.fused_kernels:
        backend = "foreach"
    if backend == "fused":
        _step_outside_graph(backends, lists, hyper, foreach=foreach, fused=fused, grad_scale=grad_scale,
                            found_inf=found_inf)
        return
    if grad_scale is not None or found_inf is not None:
        grads = amp_grads(lists[1], grad_scale, found_inf)
        if grads is None:
            return
        lists = [lists[0], grads, *lists[2:]]
    count(backends, lists[2 + backends.n_states:])
    getattr(backends, backend)(*lists, **hyper)


@torch._disable_dynamo  # outside the graph, as torch keeps its fused steps (imports Dynamo lazily, on first call)
def _step_outside_graph(backends: Backends, lists: list[list[Tensor]], hyper: dict[str, Any], **flags: Any) -> None:
    step(backends, lists, hyper, **flags)
