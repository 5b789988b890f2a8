import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors (test_fused_triton.py);
# it must be chosen before the kernels are defined (on first use, after this)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The compiled C kernels' cache (Note [kernel cache] in optimizer/_fused_cpu.py): one temporary folder for
# the session and the processes it starts, never the user's own (the cache's own tests set theirs)
_C_CACHE = tempfile.mkdtemp(prefix="clearoptim-test-cache-")
os.environ["CLEAROPTIM_CACHE_DIR"] = _C_CACHE
atexit.register(shutil.rmtree, _C_CACHE, ignore_errors=True)


def _interpreter_with_a_true_fma():
    """Triton's interpreter before 3.9 computes ``tl.fma`` on float32 as ``x * y + z`` in
    float32, rounding twice; a GPU (and the interpreter from 3.9) rounds once. The kernels'
    bit-for-bit tests against torch need the single rounding, so give older interpreters one:
    the product is exact in float64, the sum is rounded to odd there (TwoSum gives its error),
    and rounding that to float32 is then the correctly rounded fused result (Boldo and
    Melquiond, "Emulation of FMA and correctly rounded sums", 2008)."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder

    def fma_f32(x, y, z):
        p, z64 = x.astype(np.float64) * y.astype(np.float64), z.astype(np.float64)
        s = p + z64
        bp = s - z64
        err = (p - bp) + (z64 - (s - bp))
        even = (s.view(np.int64) & 1) == 0
        fix = np.isfinite(s) & (err != 0) & even  # inexact and even: the odd neighbour towards the error
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)

    one_ulp = np.float32(2.0**-23)
    x = np.array([1 + one_ulp], np.float32)
    t = interpreter.TensorHandle
    f32 = interpreter.tl.float32
    # (1 + u)(1 - u) - 1 = -u^2: a true fma gives it, a rounded product gives 0
    try:
        if builder.create_fma(None, t(x, f32), t(2 - x, f32), t(-np.ones(1, np.float32), f32)).data[0] != 0:
            return
    except Exception:  # an interpreter of another shape: leave it as it is
        return
    original = builder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return original(self, x, y, z)
        return t(fma_f32(*np.broadcast_arrays(x.data, y.data, z.data)), z.dtype.scalar)

    builder.create_fma = create_fma


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_with_a_true_fma()


@pytest.fixture
def triton_on_this_device():
    """For one test, lets the dispatcher send this machine's tensors to the Triton kernels: CUDA
    tensors on a GPU, CPU tensors (through Triton's interpreter) without one. The Triton test
    modules take it for every test (``pytestmark``)."""
    from optimizer import _dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    added = device not in _dispatch.TRITON_DEVICES
    _dispatch.TRITON_DEVICES.add(device)
    yield
    if added:
        _dispatch.TRITON_DEVICES.discard(device)

# 25 examples a property by default; CI replays the same examples every run (a red CI then
# means a change broke something); HYPOTHESIS_PROFILE=thorough explores many more.
common = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", **common)
settings.register_profile("ci", **common, derandomize=True)
settings.register_profile("thorough", **dict(common, max_examples=400))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "quick"))
