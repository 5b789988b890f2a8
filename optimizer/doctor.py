"""``python -m optimizer doctor``: which backend updates what on this machine, and whether
each one computes the reference's update.

A user who sees a loss curve move after an upgrade, a new machine or a missing compiler
asks three questions: what is installed (Python, torch and its build, Triton, the C
compiler and OpenMP that the fused CPU loop is built with), which backend the default
(``foreach=None, fused=None``) picks for their parameters, and whether that backend
agrees with the reference. This module answers them in one screen, from the library's
own decisions: the default's pick is recorded while the dispatcher runs a real step
(``_dispatch.route`` via the optimizer's step; SparseAdamW's rows via its own router),
never re-derived here. The exit status is 1 when a backend that the default picks
disagrees with the reference, so that the command can gate a CI job or a cluster image.

Note [doctor probe]
~~~~~~~~~~~~~~~~~~~
For each device, algorithm (AdamW, Lion; SparseAdamW's sparse-row path), state format
(the default; bf16 states; 8-bit states) and parameter dtype, a probe of three tensors
(16 x 320, which 8-bit states quantise, 1000 and 3 values: a weight, a bias and a
scale) takes ``STEPS`` steps with random gradients from a fixed seed, first with the
reference (``foreach=False, fused=False``), then with each backend that takes it, and
with the default. Each step of a backend starts from the parameters and states the
reference had before that step, so that what is compared is one step's rounding, not
a difference carried along: a square root an ulp off (torch's CPU ``sqrt`` is MKL's
vector math in many builds; the C loops' is correctly rounded) would otherwise move an
8-bit code at a rounding boundary and, through it, the next steps by far more than an
ulp. With 8-bit states only the quantised tensor is compared: the others keep float
states and take the backends of the default states' probe, which compares them.

A backend agrees when, after every step and for every tensor (parameters and states),
the largest difference is at most ``TOLERANCE_ULPS`` = 4 units of rounding (``eps`` of
the tensor's dtype) times the tensor's largest value. The C loops and the Triton kernels
use the reference's operations in its order and equal it bit for bit where torch's own
operations are correctly rounded (tests/test_8bit_c.py); where they are not (torch's
CPU ``sqrt``, float32 and float64, in many builds; its CUDA division by a number) a step
differs by about an ulp of a result, and torch's fused AdamW orders its roundings its
own way: an ulp or two of the stored values, which 4 covers with room. A wrong formula
or a missed element is off by far more: AdamW's update is 1e-3 of the values and its
weight decay 1e-4, two to three orders of magnitude above the float32 tolerance (bf16
and fp16 parameters round such differences away, but their float32 states keep them).
8-bit codes agree within one code, on at most 0.1% of the values (the bound of
tests/test_8bit_c.py).

The probe is small on purpose, and runs on one thread (``torch.set_num_threads(1)``,
restored after): its tensors are one block of the C loop, and on a busy machine waking
threads for tensors this small costs more than the work. It checks the arithmetic and
the dispatch; the threads' split of tensors of many blocks is the tests'
(tests/test_fused_cpu.py).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import math
import platform
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from . import _8bit, _dispatch, _fused_cpu, sparse_adamw
from ._tensors import state_dtype
from .adamw import AdamW
from .lion import Lion
from .sparse_adamw import SparseAdamW

__all__ = ["DTYPES", "STEPS", "TOLERANCE_ULPS", "Check", "Report", "as_json", "diagnose", "render", "run"]

STEPS = 3
SEED = 0
SHAPES = ((16, 320), (1000,), (3,))  # Note [doctor probe]: the first is quantised by 8-bit states
SPARSE_SHAPE, SPARSE_ROWS = (64, 40), 24  # a table, and the rows a step's gradient touches (repeats summed)
TOLERANCE_ULPS = 4  # Note [doctor probe]
CODES_OFF = 1e-3  # the fraction of 8-bit codes that may be one code off (tests/test_8bit_c.py)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
CUDA_DTYPES = ("fp32", "bf16", "fp16")
FORMATS = {"default": None, "bf16": torch.bfloat16, "8-bit": torch.uint8}  # the state_dtype option
ALGORITHMS: dict[str, type] = {"AdamW": AdamW, "Lion": Lion}
SETTINGS = {"weight_decay": 0.1}  # the rest the defaults: the update users get, decay included
LABELS = {"reference": "reference", "foreach": "foreach", "c": "C loop", "torch": "torch", "triton": "Triton"}
WIDTH = 100  # columns of the output
MAX_FINDINGS = 6  # disagreements listed under the table (--json has them all)
NOT_OFFERED = "not offered for this dtype"
NOT_8BIT = "8-bit states are for fp32, bf16 and fp16 parameters"


@dataclass
class Check:
    """One backend on one probe: available or why not, the default's pick or not, and how it
    compares with the reference (Note [doctor probe])."""

    device: str
    algorithm: str
    states: str
    dtype: str
    backend: str
    available: bool = True
    why: str = ""  # why not available
    default: bool = False  # the default's pick for the probe's first tensor (or the default's own run)
    verdict: str = ""  # "bit-equal", "agrees", "disagrees" or "error"
    max_abs: float = 0.0  # the largest difference in a parameter or a float state
    max_rel: float = 0.0  # the largest difference relative to its tensor's largest value
    ulps: float = 0.0  # the largest of those relative differences over its tensor's eps: agrees if <= 4
    codes_off: int = 0  # 8-bit codes that differ (by one, if it agrees)
    error: str = ""


@dataclass
class Report:
    """What the command prints: the versions, the C toolchain, the devices checked (or why not),
    every backend's check and the default's own run on each probe."""

    versions: dict[str, str]
    toolchain: dict[str, str]
    devices: dict[str, str]  # device -> "" where checked, else why not
    checks: list[Check] = field(default_factory=list)
    defaults: list[Check] = field(default_factory=list)  # the default's own runs, one per probe

    @property
    def failures(self) -> list[Check]:
        """The probes where the default's run, or the backend it picks run alone, disagrees with
        the reference (one each): what makes the exit status 1."""
        found: dict[tuple[str, ...], Check] = {}
        for c in [*self.defaults, *self.checks]:
            if c.default and c.verdict in ("disagrees", "error"):
                found.setdefault((c.device, c.algorithm, c.states, c.dtype), c)
        return list(found.values())


# ----- one probe ------------------------------------------------------------------------------


@dataclass
class _Compared:
    ok: bool = True
    equal: bool = True
    max_abs: float = 0.0
    max_rel: float = 0.0
    ulps: float = 0.0
    codes_off: int = 0

    def add(self, other: _Compared) -> None:
        self.ok &= other.ok
        self.equal &= other.equal
        self.max_abs, self.max_rel = max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel)
        self.ulps = max(self.ulps, other.ulps)
        self.codes_off += other.codes_off


def _compare(got: Tensor, want: Tensor, code: str | None) -> _Compared:
    """One tensor against the reference's (Note [doctor probe]); ``code``: "signed" or "root"
    for 8-bit codes, else None."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return _Compared(ok=False, equal=False, max_abs=math.inf, max_rel=math.inf, ulps=math.inf)
    if code is not None:
        if code == "signed":
            got, want = got.view(torch.int8), want.view(torch.int8)
        off = (got.int() - want.int()).abs()
        n = int((off != 0).sum())
        return _Compared(ok=n == 0 or (int(off.max()) <= 1 and n <= CODES_OFF * off.numel()), equal=n == 0,
                         codes_off=n)
    a, b = got.double(), want.double()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)
    largest = float(diff.max()) if diff.numel() else 0.0
    scale = float(b.abs().nan_to_num(nan=0.0, posinf=0.0).max()) if b.numel() else 0.0
    rel = largest / scale if scale > 0 else (0.0 if largest == 0 else math.inf)
    ulps = rel / torch.finfo(want.dtype).eps
    return _Compared(ok=ulps <= TOLERANCE_ULPS, equal=largest == 0, max_abs=largest, max_rel=rel, ulps=ulps)


@dataclass
class _Snapshot:
    params: list[Tensor]
    states: list[dict[str, Tensor]]


def _snapshot(params: list[Tensor], opt: torch.optim.Optimizer) -> _Snapshot:
    return _Snapshot([p.detach().clone() for p in params],
                     [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state])


@dataclass
class _Probe:
    """The parameters' initial values and each step's gradients, and the reference's run."""

    cls: type
    kwargs: dict[str, Any]
    params: list[Tensor]
    grads: list[list[Tensor]]
    codes: dict[str, str]  # state key -> 8-bit code kind
    compared: list[int]  # the tensors compared: those the probe's backends update
    before: list[_Snapshot] = field(default_factory=list)
    after: list[_Snapshot] = field(default_factory=list)
    hyper: dict[str, Any] = field(default_factory=dict)  # the reference's keyword arguments
    last: list[Tensor] = field(default_factory=list)  # the parameters of the last replay

    def __post_init__(self) -> None:
        params = [torch.nn.Parameter(p.clone()) for p in self.params]
        opt = self.cls(params, foreach=False, fused=False, **self.kwargs)
        self.hyper = opt._hyper(opt.param_groups[0])
        for gs in self.grads:
            self.before.append(_snapshot(params, opt))
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            self.after.append(_snapshot(params, opt))

    def replay(self, cls: type, flags: dict[str, Any]) -> _Compared:
        """Each step of ``cls`` (a backend's) from the reference's parameters and state before
        it, compared with the reference's after it."""
        params = self.last = [torch.nn.Parameter(p.clone()) for p in self.params]
        opt = cls(params, **flags, **self.kwargs)
        result = _Compared()
        for before, after, gs in zip(self.before, self.after, self.grads):
            with torch.no_grad():
                for p, value in zip(params, before.params):
                    p.copy_(value)
                for p, saved in zip(params, before.states):
                    for key, value in saved.items():
                        opt.state[p][key].copy_(value)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            for i in self.compared:
                result.add(_compare(params[i], after.params[i], None))
                for key, want in after.states[i].items():
                    result.add(_compare(opt.state[params[i]][key], want, self.codes.get(key) if want.dtype ==
                                        torch.uint8 else None))
        return result


def _random(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: str) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _dense_probe(cls: type, fmt: torch.dtype | None, dtype: torch.dtype, device: str) -> _Probe:
    gen = torch.Generator().manual_seed(SEED)
    params = [_random(s, gen, dtype, device) for s in SHAPES]
    grads = [[_random(s, gen, dtype, device) for s in SHAPES] for _ in range(STEPS)]
    codes = dict(zip(cls.state_keys, cls.backends_8bit.c_kernel.codes))
    # with 8-bit states, the quantised tensors: the others are the default states' probe's
    compared = [i for i, p in enumerate(params) if fmt is not torch.uint8 or _8bit.quantized(p)]
    return _Probe(cls, dict(SETTINGS, state_dtype=fmt), params, grads, codes, compared)


def _sparse_probe(dtype: torch.dtype, device: str) -> _Probe:
    gen = torch.Generator().manual_seed(SEED)
    params = [_random(SPARSE_SHAPE, gen, dtype, device)]
    grads = []
    for _ in range(STEPS):
        rows = torch.randint(0, SPARSE_SHAPE[0], (SPARSE_ROWS,), generator=gen)
        values = _random((SPARSE_ROWS, *SPARSE_SHAPE[1:]), gen, dtype, device)
        grads.append([torch.sparse_coo_tensor(rows[None].to(device), values, SPARSE_SHAPE)])
    return _Probe(SparseAdamW, dict(SETTINGS), params, grads, {}, [0])


# ----- the backends of one probe ---------------------------------------------------------------


def _forced(cls: type, attr: str, fn: Callable[..., None]) -> type:
    """``cls`` whose ``backends`` (or ``backends_8bit``) run ``fn`` where they would run the
    reference (``foreach=False, fused=False``): the optimizer's own step, state and dispatch around it."""
    return type(cls.__name__, (cls,), {attr: dataclasses.replace(getattr(cls, attr), reference=fn, foreach=fn)})


def _recording(cls: type, picks: dict[int, str]) -> type:
    """``cls`` whose backends note, by parameter, which of them the dispatcher called."""
    def wrap(name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def backend(*lists: list[Tensor], **hyper: Any) -> None:
            picks.update((id(p), name) for p in lists[0])
            fn(*lists, **hyper)
        return backend

    classes = {}
    for attr in ("backends", "backends_8bit"):
        b = getattr(cls, attr)
        replaced = {name: wrap(name, getattr(b, name)) for name in ("reference", "foreach", "c", "torch")
                    if getattr(b, name) is not None}
        classes[attr] = dataclasses.replace(b, **replaced)
    return type(cls.__name__, (cls,), classes)


def _triton(backends: _dispatch.Backends) -> Callable[..., None]:
    """The Triton kernel of ``backends`` with the backends' signature (the dispatcher launches it
    from its module, with GradScaler's arguments)."""
    kernel = getattr(_dispatch.load_triton(True), backends.triton)

    def backend(*lists: list[Tensor], **hyper: Any) -> None:
        kernel(*lists, **hyper, grad_scale=None, found_inf=None)
    return backend


def _why(err: Exception) -> str:
    """Why a fused kernel is missing, from the error of the dispatcher's ``fused=True``."""
    text = str(err).removeprefix("fused=True: ")
    if "Triton" in text:
        return "Triton not installed" if _version("triton") is None else f"Triton cannot be imported: {text}"
    return f"not built: {text}"


def _offered(backends: _dispatch.Backends, name: str, device: str, pdt: torch.dtype, sdt: torch.dtype,
             hyper: dict[str, Any]) -> str:
    """"" where backend ``name`` takes parameters of ``pdt`` with states of ``sdt`` on ``device``,
    else why not, as the dispatcher decides (Note [backends])."""
    try:
        if name == "c":
            return "" if (pdt, sdt) in _fused_cpu.library(backends.c_kernel, strict=True) else NOT_OFFERED
        if name == "torch":  # the dispatcher's choice among the CPU's fused kernels: torch's first
            chosen = _dispatch.fused_kernel(backends, hyper, device, pdt, sdt, True, True, strict=False)
            return "" if chosen == "torch" else NOT_OFFERED
        if name == "triton":
            kernels = _dispatch.load_triton(True)
            ok = hasattr(kernels, backends.triton) if backends.eight_bit else (pdt, sdt) in kernels.SUPPORTED
            return "" if ok else NOT_OFFERED
    except RuntimeError as err:
        return _why(err)
    return ""  # the reference, foreach: any tensor


def _run_check(check: Check, replay: Callable[[], _Compared]) -> None:
    try:
        got = replay()
    except Exception as err:  # noqa: BLE001 - a backend that fails is a finding, not a crash of the doctor
        check.verdict, check.error = "error", f"{type(err).__name__}: {err}"
        check.max_abs = check.max_rel = check.ulps = math.inf
        return
    check.verdict = "bit-equal" if got.equal else "agrees" if got.ok else "disagrees"
    check.max_abs, check.max_rel, check.ulps, check.codes_off = got.max_abs, got.max_rel, got.ulps, got.codes_off


def _dense_checks(device: str, algorithm: str, states: str, dtype: str) -> tuple[list[Check], Check | None]:
    """Every backend on one probe, and the default's run (None where the state format does not apply)."""
    cls, fmt, pdt = ALGORITHMS[algorithm], FORMATS[states], DTYPES[dtype]
    eight = fmt is torch.uint8
    attr = "backends_8bit" if eight else "backends"
    backends = getattr(cls, attr)
    names = ["foreach", "c", "torch"] if device == "cpu" else ["foreach", "triton"]
    names = [n for n in names if n != "torch" or backends.torch is not None]
    head = dict(device=device, algorithm=algorithm, states=states, dtype=dtype)
    first = torch.empty(SHAPES[0], dtype=pdt, device="meta")
    if eight and not _8bit.quantized(first):
        return [Check(**head, backend=n, available=False, why=NOT_8BIT) for n in names], None
    probe = _dense_probe(cls, fmt, pdt, device)
    sdt = torch.uint8 if eight else state_dtype(first, fmt)
    checks = []
    for name in names:
        check = Check(**head, backend=name, why=_offered(backends, name, device, pdt, sdt, probe.hyper))
        check.available = not check.why
        if check.available:
            fn = _triton(backends) if name == "triton" else getattr(backends, name)
            _run_check(check, lambda: probe.replay(_forced(cls, attr, fn), dict(foreach=False, fused=False)))
        checks.append(check)
    picks: dict[int, str] = {}
    default = Check(**head, backend="", default=True)
    _run_check(default, lambda: probe.replay(_recording(cls, picks), dict(foreach=None, fused=None)))
    # the pick for the probe's first tensor (the one 8-bit states quantise); on CUDA one the backends
    # did not record is Triton's, which the dispatcher launches from its module, not through ``Backends``
    unseen = "triton" if device in _dispatch.TRITON_DEVICES and default.verdict != "error" else "unknown"
    default.backend = picks.get(id(probe.last[0]), unseen) if probe.last else unseen
    for check in checks:
        check.default = check.backend == default.backend
    return checks, default


def _sparse_checks(device: str, dtype: str) -> tuple[list[Check], Check]:
    """SparseAdamW's sparse-row path: its fused kernel (``fused=True``, the C loop or Triton) and
    its default, as its own router (``sparse_adamw.route_rows``) decides."""
    head = dict(device=device, algorithm="SparseAdamW", states="default", dtype=dtype)
    name = "c" if device == "cpu" else "triton"
    check = Check(**head, backend=name)
    probe = _sparse_probe(DTYPES[dtype], device)
    table = probe.params[0]
    moments = [torch.zeros_like(table, dtype=state_dtype(table))]

    def route(fused: bool | None) -> str:
        return next(iter(sparse_adamw.route_rows([table], moments, moments, foreach=None, fused=fused)))

    try:
        check.why = "" if route(True) == name else NOT_OFFERED
    except RuntimeError as err:
        check.why = _why(err)
    check.available = not check.why
    if check.available:
        _run_check(check, lambda: probe.replay(SparseAdamW, dict(fused=True)))
    default = Check(**head, backend=route(None), default=True)
    _run_check(default, lambda: probe.replay(SparseAdamW, dict(foreach=None, fused=None)))
    check.default = check.backend == default.backend
    return [check], default


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str]:
    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU"
    versions = {"python": f"{platform.python_version()} ({platform.python_implementation()}, {platform.system()} "
                          f"{platform.machine()})",
                "torch": torch.__version__, "torch_build": build, "torch_threads": str(torch.get_num_threads()),
                "triton": _version("triton") or "not installed"}
    if torch.cuda.is_available():
        versions["cuda_device"] = torch.cuda.get_device_name(0)
    return versions


def diagnose(devices: list[str] | None = None) -> Report:
    """Every check of Note [doctor probe] on ``devices`` (default: the CPU, and CUDA where present)."""
    present = {"cpu": "", "cuda": "" if torch.cuda.is_available() else "no CUDA device" + (
        f" (torch {torch.__version__} is a CPU build)" if torch.version.cuda is None else "")}
    wanted = devices or list(present)
    report = Report(_versions(), {}, {d: why for d, why in present.items() if d in wanted})
    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # the fallbacks' warnings: the table says the same, backend by backend
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)  # Note [doctor probe]: one block of work; waking threads would cost more
        try:
            _check_devices(report)
        finally:
            torch.set_num_threads(threads)
        report.toolchain = _fused_cpu.toolchain()  # after the kernels: it then says how they were built
    return report


def _check_devices(report: Report) -> None:
    """The checks of every device that ``report`` has without a reason not to."""
    for device in [d for d, why in report.devices.items() if not why]:
        dtypes = list(DTYPES) if device == "cpu" else list(CUDA_DTYPES)
        for algorithm, states, dtype in itertools.product(ALGORITHMS, FORMATS, dtypes):
            checks, default = _dense_checks(device, algorithm, states, dtype)
            report.checks += checks
            report.defaults += [default] if default is not None else []
        for dtype in dtypes:
            checks, default = _sparse_checks(device, dtype)
            report.checks += checks
            report.defaults.append(default)


# ----- output -------------------------------------------------------------------------------------


def _symbols(stream: TextIO) -> dict[str, str]:
    """The table's marks, in ASCII where the output cannot encode others."""
    fancy = {"about": "\u2248", "bad": "\u2717", "none": "\u2013"}
    try:
        "".join(fancy.values()).encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return {"about": "~", "bad": "X", "none": "-"}
    return fancy


def _cell(check: Check | None, picked: bool, marks: dict[str, str]) -> str:
    if check is None:
        return ""
    star = "*" if picked else ""
    if not check.available:
        return star + marks["none"]
    if check.verdict == "bit-equal":
        return star + "="
    if check.verdict == "error":
        return star + marks["bad"] + "error"
    mark = marks["about"] if check.verdict == "agrees" else marks["bad"]
    if check.verdict == "disagrees" and check.ulps <= TOLERANCE_ULPS:
        return star + mark + "codes"  # the floats agree; the 8-bit codes do not
    return star + mark + (f"{check.ulps:.2g}" if check.ulps < 100 else f"{check.ulps:.0e}")


def _row_wide(checks: list[Check]) -> str:
    """Why a backend takes none of a row's probes, where it is one reason for all (not built, no
    Triton), else ""."""
    reasons = {c.why for c in checks}
    if any(c.available for c in checks) or len(reasons) != 1:
        return ""
    why = reasons.pop()
    return "" if why in (NOT_OFFERED, NOT_8BIT) else why


def _itself(check: Check) -> Check:
    """The reference on ``check``'s probe, where the probe exists."""
    if check.why == NOT_8BIT:
        return dataclasses.replace(check, backend="reference")
    return dataclasses.replace(check, backend="reference", available=True, why="", verdict="bit-equal")


def _wrapped(label: str, text: str, indent: int = 12) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"{label:<{indent}}", subsequent_indent=" " * indent)


def _table(report: Report, device: str, marks: dict[str, str]) -> list[str]:
    """One row per algorithm, state format and backend; one column per parameter dtype."""
    v = report.versions
    dtypes = list(DTYPES) if device == "cpu" else list(CUDA_DTYPES)
    what = "(probed on one thread)" if device == "cpu" else v.get("cuda_device", "")
    lines = ["", f"{f'{device} {what}':<34}" + "".join(f"{d:<10}" for d in dtypes).rstrip()]
    groups: dict[tuple[str, str], dict[str, dict[str, Check]]] = {}  # -> backend -> dtype -> check
    for c in report.checks:
        if c.device == device:
            groups.setdefault((c.algorithm, c.states), {}).setdefault(c.backend, {})[c.dtype] = c
    defaults = {(d.algorithm, d.states, d.dtype): d for d in report.defaults if d.device == device}
    for (algorithm, states), backends in groups.items():
        picks = {dtype: defaults[(algorithm, states, dtype)] for dtype in dtypes if (algorithm, states, dtype)
                 in defaults}
        if any(d.backend == "reference" for d in picks.values()):  # a row for it: the reference is itself
            probes = next(iter(backends.values()))
            backends = {"reference": {dtype: _itself(c) for dtype, c in probes.items()}, **backends}
        rows = [(name, cells, _row_wide(list(cells.values()))) for name, cells in backends.items()]
        rows = [row for row in rows if row[2] or any(c.available for c in row[1].values())
                or any(d.backend == row[0] for d in picks.values())]
        for i, (name, cells, whole) in enumerate(rows):
            label = f"{algorithm if i == 0 else '':<12}{states if i == 0 else '':<9}{LABELS[name]:<13}"
            if whole:  # the whole reason is in --json; the compiler's or Triton's state is above
                lines.append(label + "not available: " + ("cannot be built here (see 'C compiler' above)"
                                                          if whole.startswith("not built") else whole[:WIDTH - 49]))
                continue
            texts = []
            for dtype in dtypes:
                check, default = cells.get(dtype), picks.get(dtype)
                picked = default is not None and default.backend == name
                if picked and default.verdict not in ("bit-equal", "agrees"):
                    check = default  # what the default did, whatever the forced run said
                texts.append(_cell(check, picked, marks))
            lines.append((label + "".join(f"{t:<10}" for t in texts)).rstrip())
    return lines


def render(report: Report, stream: TextIO) -> str:
    """The table of Note [doctor probe], with versions above and a legend below, in 100 columns."""
    marks = _symbols(stream)
    v, tc = report.versions, report.toolchain
    triton = f"Triton {v['triton']} installed" if v["triton"] != "not installed" else "Triton not installed"
    device = f"CUDA device: {v['cuda_device']}" if "cuda_device" in v else "no CUDA device"
    lines = _wrapped("Python", v["python"])
    lines += _wrapped("torch", f"{v['torch']} ({v['torch_build']} build, {v['torch_threads']} CPU threads); {triton}; "
                      f"{device}")
    lines += _wrapped("C compiler", f"{tc.get('compiler')}: {tc.get('version')}; OpenMP {tc.get('openmp')}")
    lines += _wrapped("C flags", tc.get("flags", ""))
    lines += _wrapped("C cache", tc.get("cache", ""))
    for where, why in report.devices.items():
        lines += _wrapped(where, f"not checked: {why}") if why else _table(report, where, marks)
    eps = ", ".join(f"{d} {torch.finfo(t).eps:.1e}" for d, t in DTYPES.items())
    legend = (f"* the backend that the default (foreach=None, fused=None) picks; = bit-equal to the reference "
              f"(foreach=False, fused=False); {marks['about']}x agrees, {marks['bad']}x disagrees: x is the largest "
              f"difference in a parameter or state, in roundings: eps of the tensor's dtype ({eps}) times its "
              f"largest value; agrees: x <= {TOLERANCE_ULPS}, and 8-bit codes within one, on at most "
              f"{CODES_OFF:.1%} of them; {marks['none']} not offered for this dtype. Probe: tensors "
              f"{', '.join('x'.join(map(str, s)) for s in SHAPES)} (8-bit states quantise the first; SparseAdamW: "
              f"a {'x'.join(map(str, SPARSE_SHAPE))} table), {STEPS} steps with random gradients (seed {SEED}), "
              f"each from the reference's state (Note [doctor probe] in optimizer/doctor.py).")
    lines += [""] + textwrap.wrap(legend, WIDTH)
    failures = report.failures
    noted = [c for c in report.checks if c.verdict in ("disagrees", "error") and not c.default]
    shown = failures[:MAX_FINDINGS] + noted[:max(MAX_FINDINGS - len(failures), 0)]
    for c in shown:
        where = f"{c.device} {c.algorithm}, {c.states} states, {c.dtype}:"
        lines += (_wrapped("FAIL", f"{where} the default ({LABELS.get(c.backend, c.backend)}) {_how(c)}", 5)
                  if c.default else
                  _wrapped("note", f"{where} {LABELS[c.backend]} {_how(c)}; not the default's pick", 5))
    if len(failures) + len(noted) > len(shown):
        lines.append(f"     ... and {len(failures) + len(noted) - len(shown)} more: --json lists every check")
    lines.append("OK: every backend that the default picks agrees with the reference." if not failures else
                 f"{len(failures)} of the default's picks disagree with the reference: exit status 1.")
    return "\n".join(lines) + "\n"


def _how(c: Check) -> str:
    """How a check failed, in words."""
    if c.verdict == "error":
        return f"fails: {c.error}"
    codes = f"; {c.codes_off} 8-bit codes differ" if c.codes_off else ""
    return (f"differs from the reference by {c.ulps:.3g} roundings (tolerance {TOLERANCE_ULPS}): "
            f"{c.max_rel:.1e} of a tensor's largest value{codes}")


def as_json(report: Report) -> str:
    """The report for programs: every check, the default's runs, and "ok" (the exit status 0)."""
    def finite(x: Any) -> Any:
        return x if not isinstance(x, float) or math.isfinite(x) else None

    def entry(c: Check) -> dict[str, Any]:
        return {k: finite(v) for k, v in dataclasses.asdict(c).items()}

    return json.dumps({
        "versions": report.versions, "toolchain": report.toolchain, "devices": report.devices,
        "steps": STEPS, "seed": SEED,
        "tolerance_ulps": TOLERANCE_ULPS, "eps": {d: torch.finfo(t).eps for d, t in DTYPES.items()},
        "checks": [entry(c) for c in report.checks], "defaults": [entry(c) for c in report.defaults],
        "ok": not report.failures,
    }, indent=1) + "\n"


def run(devices: list[str] | None = None, json_output: bool = False, stream: TextIO | None = None) -> int:
    """Diagnose, print the table (or JSON) to ``stream``; 1 where a default backend disagrees, else 0."""
    stream = sys.stdout if stream is None else stream
    report = diagnose(devices)
    stream.write(as_json(report) if json_output else render(report, stream))
    return 1 if report.failures else 0
