"""The C source of the fused CPU kernels: optimizer/csrc/*.{h,c} plus each algorithm's body,
generated per kernel (Note [fused CPU]); every variant compiles cleanly with warnings as errors."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from optimizer import _fused_cpu
from optim_table import OPTIMIZERS, ids

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "single-threaded"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_every_variant_compiles_with_warnings_as_errors(info, openmp, tmp_path):
    kernel = info.cls.backends.c_kernel
    src, lib = tmp_path / f"{kernel.name}.c", tmp_path / f"{kernel.name}.so"
    src.write_text(_fused_cpu.source(kernel))
    cmd = ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
           *(["-fopenmp"] if openmp else []), str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = ctypes.CDLL(str(lib))
    for ptype, stype, _ in _fused_cpu._VARIANTS.values():
        if ptype != "f16" or hasattr(loaded, f"{kernel.name}_f16_float"):  # f16 only where C has _Float16
            assert hasattr(loaded, f"{kernel.name}_{ptype}_{stype}")


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_the_source_shows_the_algorithms_body_and_the_shared_loop(info):
    kernel = info.cls.backends.c_kernel
    text = _fused_cpu.source(kernel)
    for line in kernel.body.strip().splitlines():
        assert line.strip() in text
    assert "void FN(int64_t n_tensors" in text and "static inline bf16 store_bf16" in text
    assert text.count("\nvoid FN(") == len(_fused_cpu._VARIANTS)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_kernel_source_command_prints_what_is_compiled(info):
    import sys

    name = info.cls.backends.c_kernel.name
    done = subprocess.run([sys.executable, "-m", "optimizer", "kernel-source", name], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _fused_cpu.source(info.cls.backends.c_kernel)
