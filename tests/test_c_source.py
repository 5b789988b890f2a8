"""The C source of the fused CPU kernels: optimizer/csrc/*.{h,c} plus each algorithm's body,
generated per kernel (Note [fused CPU]); every variant compiles cleanly with warnings as errors."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
from optim_table import OPTIMIZERS, ids

from optimizer import _fused_cpu

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

# every C kernel: each optimizer's float-state loop, and its 8-bit one (Note [8-bit states])
KERNELS = [info.cls.backends.c_kernel for info in OPTIMIZERS] + [info.cls.backends_8bit.c_kernel for info in OPTIMIZERS]
KERNEL_IDS = [kernel.name for kernel in KERNELS]


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])  # with and without a fast fma
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "single-threaded"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_every_variant_compiles_with_warnings_as_errors(kernel, openmp, native, tmp_path):
    src, lib = tmp_path / f"{kernel.name}.c", tmp_path / f"{kernel.name}.so"
    src.write_text(_fused_cpu.source(kernel))
    cmd = ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
           *(["-fopenmp"] if openmp else []), *(["-march=native"] if native else []), str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = ctypes.CDLL(str(lib))
    variants = _fused_cpu.variants(kernel).values()
    has_f16 = any(hasattr(loaded, f"{kernel.name}_f16_{stype}") for _, stype, _ in variants)
    for ptype, stype, _ in variants:
        if ptype != "f16" or has_f16:  # f16 only where C has _Float16
            assert hasattr(loaded, f"{kernel.name}_{ptype}_{stype}")
    assert hasattr(loaded, "count_steps_float") and hasattr(loaded, "count_steps_double")


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_the_source_shows_the_algorithms_body_and_the_shared_loop(kernel):
    text = _fused_cpu.source(kernel)
    for line in kernel.body.strip().splitlines():
        assert line.strip() in text
    assert "void FN(int64_t n_tensors" in text and "static inline bf16 store_bf16" in text
    assert "static inline bf16 store_sr_bf16" in text  # stochastic rounding (Note [stochastic rounding])
    assert text.count("\nvoid FN(") == len(_fused_cpu.variants(kernel))
    assert ("static inline void encode_signed" in text) == bool(kernel.codes)
    assert kernel.loop == ("8bit_loop.c" if kernel.codes else "fused_loop.c")


def test_the_compile_flags_are_those_the_tests_assume():
    """-ffp-contract=off: every rounding as written (the bit-for-bit tests depend on it)."""
    assert "-ffp-contract=off" in _fused_cpu._CFLAGS and "-ffast-math" not in _fused_cpu._CFLAGS


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_kernel_source_command_prints_what_is_compiled(info):
    import sys

    name = info.cls.backends.c_kernel.name
    done = subprocess.run([sys.executable, "-m", "optimizer", "kernel-source", name], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _fused_cpu.source(info.cls.backends.c_kernel)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_kernel_source_command_prints_the_8bit_kernel(info):
    import sys

    kernel = info.cls.backends_8bit.c_kernel
    done = subprocess.run([sys.executable, "-m", "optimizer", "kernel-source", kernel.name], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _fused_cpu.source(kernel)
