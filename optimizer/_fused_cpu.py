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
  tensors. The first step that needs it loads it from the cache of compiled
  libraries, or compiles it (Note [kernel cache]; a compile is logged at INFO on
  the ``optimizer`` logger, with its time), while the step is checked
  (Note [two-phase step]): a failure cannot leave a step half done.
* Why not ``torch.compile``: Inductor generates the same loop, but one compiled
  function per tensor, and each call of one costs Python time that adds up over
  the many tensors of a model, while ours is one call per step; small tensors
  would still go the foreach way; and its first compile takes far longer than
  this one.
* Whatever goes wrong (no compiler, ``$CC`` failing or writing nothing, a
  library that cannot be loaded, e.g. from a ``noexec`` folder), it goes
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

Note [kernel cache]
~~~~~~~~~~~~~~~~~~~
A compiled library is kept for the next processes, as torch's C++ extensions and Triton
keep theirs, in the folder ``c-kernels`` of ``$CLEAROPTIM_CACHE_DIR``, else of
``$XDG_CACHE_HOME/clearoptim`` (``~/.cache/clearoptim``). ``CLEAROPTIM_CACHE_DIR=""``
turns the cache off: every process compiles its own, as without a cache.

* An entry is a folder named by the kernel and a hash of all that decides the library:
  the translation unit (``source(kernel)``), the flags (every set tried, in order), the
  compiler (its command line, the resolved path of its program, its ``--version``) and
  the processor that ``-march=native`` builds for (a cache in a home folder shared by
  machines of several kinds must not hand one of them instructions it lacks). A change
  of any of them builds a new entry; old entries stay until removed by hand. A compiler
  whose ``--version`` fails cannot be told from another: its libraries are not cached.
* The entry holds the library, its source and ``build.json`` (the flags that built it,
  and the first error line of each set that did not: ``toolchain()`` reads them).
* No reader sees half an entry: the compile runs in a private temporary folder, as
  without a cache; its result is copied into a private folder inside the cache, then
  renamed to the entry's name in one step. Renaming a folder onto one that exists fails:
  processes (torchrun ranks) that build the same entry at once all get a working
  library, the first to rename its copy puts it in the cache, the others load that one.
* Loading a library runs its code, so it is loaded only from folders and files that
  this user owns and that neither its group nor others may write: the cache folder and
  ``c-kernels`` (made with mode 0o700), the entry and its files are checked first.
* Where the cache cannot be used (off; not writable, e.g. a read-only home; not this
  user's; writable by others; an entry that cannot be read or loaded, e.g. from a
  ``noexec`` home), the library is compiled and loaded from the temporary folder, as
  without a cache, and the compile's INFO line says why it was not cached. No warning:
  the cache saves time, it changes no result.
* A staging folder left in the cache by a process killed while copying is removed by
  the next compile on the same machine (the folder's name holds the machine's name and
  the process id: a cache shared by several machines holds folders of processes that
  this one cannot see).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import logging
import operator
import os
import pathlib
import platform
import shlex
import shutil
import socket
import stat
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

__all__ = ["BLOCK", "QBLOCK", "Kernel", "library", "run", "source", "toolchain", "variants"]

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
                    f"decode_{code}_block(C_{s}, n, buf_{s}, *Z_{s});"
                    for s, code in zip(kernel.states, kernel.codes)
                ],
            ),
            _macro("KERNEL_LOAD", [f"T {s} = buf_{s}[i];" for s in kernel.states]),
            _macro("KERNEL_KEEP", [f"buf_{s}[i] = {s}; top_{s} = top_bits(top_{s}, {s});" for s in kernel.states]),
            # a second moment's codes round stochastically with the seed of the tensor's step
            _macro("KERNEL_ENCODE", [
                f"encode_{code}(buf_{s}, n, C_{s}, Z_{s}, top_{s}"
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
_CACHE_FOLDER = "c-kernels"  # the C libraries' folder in the cache folder (Note [kernel cache])
_CACHE_FORMAT = "1"  # in every key: a change of what an entry holds, or of how it is read, makes new entries
_BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class _Build:
    """How a library was built: the flag set that worked, and (flags, first error line) of each set before it."""

    flags: tuple[str, ...]
    failed: tuple[tuple[tuple[str, ...], str], ...] = ()

    @property
    def how(self) -> str:
        return " ".join(self.flags) or "single-threaded"

    def to_json(self) -> str:
        return json.dumps({"flags": list(self.flags), "failed": [[list(f), e] for f, e in self.failed]})

    @classmethod
    def from_json(cls, text: str) -> _Build:
        record = json.loads(text)
        return cls(tuple(map(str, record["flags"])), tuple((tuple(map(str, f)), str(e)) for f, e in record["failed"]))


@dataclass(frozen=True)
class _Loaded:
    """A loaded library, how it was built, and where from: ``entry`` is its folder in the cache (``hit``:
    it was there already), or None with ``why`` it was not cached (Note [kernel cache])."""

    lib: ctypes.CDLL
    build: _Build
    hit: bool
    entry: pathlib.Path | None
    why: str = ""


_loaded: dict[str, _Loaded] = {}  # by kernel name (and the probe's), for toolchain()
_identities: dict[tuple[str, ...], tuple[str, str]] = {}
_probe_failed: list[str] = []
# toolchain()'s probe, where no kernel was loaded: built as a kernel is (the same flag sets, the
# cache), it shows which flags build here and whether OpenMP is one of them
_PROBE_NAME, _PROBE_SOURCE = "probe", """/* a probe of the C toolchain for optimizer._fused_cpu.toolchain */
int clearoptim_probe(void) {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += 1;
    return n;
}
"""


def _compiler() -> list[str]:
    """The C compiler's command line: ``$CC`` parsed as a shell would (``CC="ccache gcc"``), else ``cc``."""
    try:
        cmd = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as err:
        raise RuntimeError(f"CC={os.environ['CC']!r} cannot be parsed ({err})") from err
    if not cmd or shutil.which(cmd[0]) is None:
        raise RuntimeError(f"no C compiler: {(cmd or [''])[0]!r} not found (set CC)")
    return cmd


def _identity(cc: list[str]) -> tuple[str, str]:
    """The resolved path of the compiler's program and what its ``--version`` prints (once per process).
    RuntimeError if that fails: such a compiler cannot be told from another (Note [kernel cache])."""
    known = _identities.get(tuple(cc))
    if known is not None:
        return known
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{shlex.join(cc)} --version could not run ({err})") from err
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cc)} --version failed (exit status {done.returncode})")
    known = _identities[tuple(cc)] = (os.path.realpath(shutil.which(cc[0]) or cc[0]), done.stdout + done.stderr)
    return known


def _processor() -> str:
    """What ``-march=native`` builds for: the first processor's identity and features (Linux), else the
    platform's name for it."""
    fields = {"vendor_id", "cpu family", "model", "model name", "flags",  # x86
              "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features",  # Arm
              "isa", "uarch", "cpu"}  # RISC-V, POWER
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block: the others are alike, and reading them all is slow
                if line.split(":", 1)[0].strip() in fields:
                    lines.append(" ".join(line.split()))
    except OSError:
        pass
    return "\n".join(lines) or f"{platform.machine()} {platform.processor()}"


def _key(cc: list[str], text: str) -> str:
    """The cache key of the library built from ``text`` (Note [kernel cache])."""
    path, version = _identity(cc)
    parts = [_CACHE_FORMAT, shlex.join(cc), path, version, _processor(), shlex.join(_CFLAGS), repr(_FLAG_SETS), text]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _check_private(path: str | os.PathLike[str]) -> None:
    """OSError unless ``path`` is this user's and neither its group nor others may write it."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise OSError(f"{os.fspath(path)} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{os.fspath(path)} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _cache_folder() -> tuple[pathlib.Path | None, str]:
    """The folder of cached libraries, made if missing and checked (Note [kernel cache]); or None and why not."""
    root = os.environ.get("CLEAROPTIM_CACHE_DIR")
    if root == "":
        return None, "CLEAROPTIM_CACHE_DIR is empty"
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # (XDG: absolute only)
        if not os.path.isabs(base):
            return None, "no home folder (set CLEAROPTIM_CACHE_DIR)"
        root = os.path.join(base, "clearoptim")
    if not hasattr(os, "getuid"):
        return None, "no file owners to check on this system"
    folder = pathlib.Path(root).expanduser().absolute() / _CACHE_FOLDER
    try:
        for path in (folder.parent, folder):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_private(path)
    except OSError as err:
        return None, str(err)
    return folder, ""


def _remove_stale_build_dirs(folder: str | os.PathLike[str] | None = None, host: str | None = None) -> None:
    """Build folders of processes that died while compiling (killed: no ``finally`` ran), in ``folder``
    (the temporary folder by default). With ``host``, folders named ``<prefix><pid>-<host>-...``
    (in the cache, which machines may share), only those of ``host``: another's pids mean nothing here."""
    folder = folder if folder is not None else tempfile.gettempdir()
    for name in os.listdir(folder):
        if not name.startswith(_DIR_PREFIX):
            continue
        pid, _, rest = name[len(_DIR_PREFIX):].partition("-")
        if host is not None and rest.rpartition("-")[0] != host:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        except (ValueError, OSError):  # not ours to judge: a malformed name, or another user's process
            pass


def _build(cc: list[str], name: str, text: str, folder: str) -> _Build:
    """Compile ``text`` into ``folder``/``name``.so with the best flag set that builds. RuntimeError if none does."""
    src, lib_path = os.path.join(folder, f"{name}.c"), os.path.join(folder, f"{name}.so")
    with open(src, "w") as f:
        f.write(text)
    failed = []
    for flags in _FLAG_SETS:
        cmd = [*cc, *_CFLAGS, *flags, src, "-o", lib_path]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            raise RuntimeError(f"{shlex.join(cc)!r} could not run: {err}") from err
        if done.returncode == 0:
            if not os.path.exists(lib_path):
                raise RuntimeError(f"{shlex.join(cc)!r} exited 0 but wrote no library")
            return _Build(tuple(flags), tuple(failed))
        failed.append((tuple(flags), (done.stderr.strip().splitlines() or ["failed"])[0]))
    raise RuntimeError(f"{shlex.join(cc)!r} failed: {failed[-1][1]}")


def _write_private(path: pathlib.Path, data: bytes) -> None:
    """A new file of this user's only (mode 0o600 whatever the umask), on the disk before it returns."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(folder: pathlib.Path, entry: pathlib.Path, built: pathlib.Path, name: str, build: _Build) -> None:
    """Put the library built in ``built`` into the cache as ``entry``, whole or not at all
    (Note [kernel cache]); where another process put it there first, theirs stays. OSError
    where the cache cannot be written."""
    host = socket.gethostname()
    _remove_stale_build_dirs(folder, host)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-{host}-", dir=folder))  # 0o700
    try:
        for file in (f"{name}.so", f"{name}.c"):
            _write_private(staging / file, (built / file).read_bytes())
        _write_private(staging / _BUILD_RECORD, build.to_json().encode())
        try:
            os.replace(staging, entry)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # (gone if renamed)


def _load_entry(entry: pathlib.Path, name: str) -> tuple[ctypes.CDLL, _Build]:
    """The library of a cache entry and its build, once the entry and its files are found private.
    OSError or ValueError where it cannot be used."""
    lib_path, record = entry / f"{name}.so", entry / _BUILD_RECORD
    for path in (entry, lib_path, record):
        _check_private(path)
    try:
        build = _Build.from_json(record.read_text())
    except (KeyError, TypeError) as err:
        raise ValueError(f"{record} is not a build record ({err!r})") from err
    return ctypes.CDLL(str(lib_path)), build


def _load_or_build(cc: list[str], name: str, text: str) -> _Loaded:
    """The library compiled from the C source ``text``: from the cache, else built (into the cache
    where it can be used, Note [kernel cache]) and loaded. RuntimeError if it cannot be built or loaded."""
    folder, why = _cache_folder()
    entry = None
    if folder is not None:
        try:
            entry = folder / f"{name}-{_key(cc, text)}"
        except RuntimeError as err:
            why = str(err)
    if entry is not None and os.path.lexists(entry):
        try:
            return _Loaded(*_load_entry(entry, name), hit=True, entry=entry)
        except (OSError, ValueError) as err:
            why, entry = f"{entry} cannot be used ({err})", None
    _remove_stale_build_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{_DIR_PREFIX}{os.getpid()}-") as tmp:
        build = _build(cc, name, text, tmp)
        if folder is not None and entry is not None:
            try:
                _publish(folder, entry, pathlib.Path(tmp), name, build)
                return _Loaded(*_load_entry(entry, name), hit=False, entry=entry)
            except (OSError, ValueError) as err:
                why = f"the cache cannot be used ({err})"
        try:
            lib = ctypes.CDLL(os.path.join(tmp, f"{name}.so"))  # loaded: the file may go
        except OSError as err:
            raise RuntimeError(f"the compiled library cannot be loaded ({err})") from err
    return _Loaded(lib, build, hit=False, entry=None, why=why)


def _compile(kernel: Kernel) -> tuple[dict[tuple[Any, torch.dtype], ctypes._CFuncPtr], _Loaded]:
    """Compile ``kernel`` with the system C compiler, or find it in the cache, and load it: (the
    functions by dtypes, how it was built and where from). Raises RuntimeError, whatever went wrong
    (no compiler, a failed build, a library that cannot be loaded, e.g. from a ``noexec`` folder)."""
    loaded = _load_or_build(_compiler(), kernel.name, source(kernel))
    fns: dict[tuple[Any, torch.dtype], ctypes._CFuncPtr] = {}
    for dtypes, (ptype, stype, _) in variants(kernel).items():
        fn = getattr(loaded.lib, _function_name(kernel, ptype, stype), None)  # no fp16 variant where C lacks _Float16
        if fn is not None:
            fn.restype = None
            fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
            fns[dtypes] = fn
    if not fns:
        raise RuntimeError(f"the compiled library has none of the {kernel.name} functions")
    for dtype, ctype in ((torch.float32, "float"), (torch.float64, "double")):
        fn = getattr(loaded.lib, f"count_steps_{ctype}")
        fn.restype, fn.argtypes = None, [ctypes.c_int64, ctypes.c_void_p]
        fns[("count", dtype)] = fn
    return fns, loaded


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
                _libraries[kernel.name], loaded = _compile(kernel)
            except Exception as err:  # noqa: BLE001 - any failure means: no fused CPU kernels here
                _failed.append(f"{type(err).__name__}: {err}" if not isinstance(err, RuntimeError) else str(err))
            else:
                _loaded[kernel.name] = loaded
                seconds = time.perf_counter() - start
                if loaded.hit:
                    log.debug("optimizer: loaded the fused CPU kernel %s (%s) from the cache, %s, in %.3f s",
                              kernel.name, loaded.build.how, loaded.entry, seconds)
                else:
                    log.info("optimizer: compiled the fused CPU kernel %s (%s) in %.2f s, %s", kernel.name,
                             loaded.build.how, seconds,
                             f"cached in {loaded.entry}" if loaded.entry else f"not cached: {loaded.why}")
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


def toolchain() -> dict[str, str]:
    """The C toolchain as the fused CPU backend finds it (for ``python -m optimizer doctor``):
    "compiler" (``$CC`` as given, else ``cc``), "version" (the first line of its ``--version``, or
    "not found"), "flags" (those a build uses, or would use if none could), "openmp" ("yes", or
    "no: <why>", from what a build managed), "cache" (the folder of cached libraries in use, or
    "off: <why>"; Note [kernel cache]). Where no kernel was loaded in this process, it loads a tiny
    probe, built and cached as a kernel is, at most once per process. Never raises."""
    info = {"compiler": os.environ.get("CC") or "cc", "version": "not found",
            "flags": " ".join([*_CFLAGS, *_FLAG_SETS[0]]), "openmp": "no: nothing was built", "cache": "off: unknown"}
    try:
        folder, why = _cache_folder()
        info["cache"] = str(folder) if folder is not None else f"off: {why}"
        cc = _compiler()
        try:
            info["version"] = (_identity(cc)[1].strip().splitlines() or ["not found"])[0]
        except RuntimeError:
            pass
        with _lock:
            if not _loaded and not _probe_failed:
                try:
                    _loaded[_PROBE_NAME] = _load_or_build(cc, _PROBE_NAME, _PROBE_SOURCE)
                except Exception as err:  # noqa: BLE001 - whatever it is, it is the answer
                    _probe_failed.append(f"the probe could not be built ({err})")
            if _probe_failed:
                info["openmp"] = f"no: {_probe_failed[0]}"
                return info
            loaded = next(iter(_loaded.values()))
        flags = loaded.build.flags
        info["flags"] = " ".join([*_CFLAGS, *flags])
        info["openmp"] = "yes" if "-fopenmp" in flags else "no: " + next(
            (error for tried, error in reversed(loaded.build.failed) if "-fopenmp" in tried), "not tried")
        info["cache"] = str(loaded.entry.parent) if loaded.entry else f"off: {loaded.why}"
    except Exception as err:  # noqa: BLE001 - it reports, never raises
        info["openmp"] = f"no: {err}"
    return info


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


def count(kernel: Kernel | None, steps: list[Tensor]) -> bool:
    """Add one to every step counter in one C call, where they are CPU float32 or float64
    tensors and ``kernel``'s library is loaded (``torch._foreach_add_`` on CPU scalars costs
    a few microseconds each). False, having changed nothing, where it does not apply (also
    for an algorithm without a C kernel)."""
    fns = None if kernel is None else _libraries.get(kernel.name)
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
