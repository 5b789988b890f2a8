"""Stochastic rounding of bf16/fp16 parameters, and the integer hash that supplies its random
bits (and those of the 8-bit second moment's codes, Note [8-bit states] in _8bit.py). Written
as plain torch: the spec that the C loop and the Triton kernels follow bit for bit
(tests/test_8bit.py ties them).

Note [stochastic rounding]
~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``stochastic_rounding=True``, a bf16/fp16 parameter's update is computed in float32
and rounded into the parameter *stochastically*: down to the representable value toward
zero, or up to the next one away from zero with probability equal to the distance to
the lower one, in units of the gap. Updates smaller than half a gap are then not lost:
they move the parameter on average (round to nearest drops every update below half a
gap: a bf16 weight at 1.0 ignores any step under 2^-9, about 0.002, downwards and under
2^-8, about 0.004, upwards). float32/float64 parameters are rounded as usual.

The random bits are a hash, not a generator: 16 bits per element,
``mix32(index ^ seed_t) >> 16`` with ``seed_t`` = :func:`rounding_seeds` of the group's
``seed``, the group's count of stochastic steps (``rounding_step``, saved with the group
in ``state_dict``) and the tensor's position among all the optimizer's parameters (its
group's offset plus its index in the group). So a run is reproducible, a resumed run is
bit-identical, and no generator state needs saving. The position is the optimizer's, not
the group's: groups left at the default seed would otherwise draw the same bits for their
first tensors at every step (one group per layer: every layer rounding alike). The
parameter rounds up iff ``bits < frac * 65536`` (``frac`` in [0, 1), exact in float32).
Where the value above is infinite (beyond the largest finite value), it rounds to nearest.

The seeds are made on the host, at each step, from a Python counter. A CUDA graph captures
them once, and every replay would round with the same bits: a fixed, biased rounding. So
a step with stochastic rounding of a bf16/fp16 tensor is refused while the current CUDA
stream is capturing (:func:`capturing`), before anything changed. Advancing them on the
device instead (as torch's capturable step counters do) would need the counter and the
hash on the device for every backend, while the reference and the C loop take their
seeds as host integers, and ``rounding_step`` is saved as a number: refusing keeps one
definition of the bits, which every backend follows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["M32", "ROUNDED", "capturing", "mix32", "random16", "round_stochastic", "rounding_seeds", "store_param"]

M32 = 0xFFFFFFFF  # the hash works on 32-bit words held in Python ints or int64 tensors


def mix32(x: int | Tensor) -> int | Tensor:
    """A 32-bit integer hash (xor-shift-multiply; both multipliers below 2^31, so int64 tensors
    hold every product exactly). Python ints or int64 tensors of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & M32
    return x ^ (x >> 16)


def rounding_seeds(seed: int, step: int, positions: int | Sequence[int]) -> list[int]:
    """The 32-bit seed of each tensor of a stochastic step, from its position among the
    optimizer's parameters (an int n: positions 0 to n - 1)."""
    base = mix32((seed & M32) ^ mix32(step & M32))
    return [mix32(base ^ mix32(i & M32)) for i in (range(positions) if isinstance(positions, int) else positions)]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph, where stochastic rounding is refused
    (Note [stochastic rounding]). Without CUDA initialised nothing can be capturing (and a CPU
    build of torch has no such query)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def random16(seed_t: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """16 random bits (int64 in [0, 65536)) for elements 0..n-1 of a tensor with seed ``seed_t``."""
    index = torch.arange(n, dtype=torch.int64, device=device) & M32
    return mix32(index ^ seed_t) >> 16


ROUNDED = (torch.bfloat16, torch.float16)  # the parameter dtypes rounded stochastically


def round_stochastic(x: Tensor, dtype: torch.dtype, seed_t: int) -> Tensor:
    """float32 ``x`` rounded stochastically into ``dtype`` (bf16 or fp16), elements taken in
    ``x``'s logical (row-major) order."""
    x = x.to(torch.float32)
    nearest = x.to(dtype)
    toward_zero = torch.where(nearest.to(torch.float32).abs() > x.abs(),
                              torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    away = torch.nextafter(toward_zero, torch.where(x < 0, -math.inf, math.inf).to(dtype))
    lo, hi = toward_zero.to(torch.float32), away.to(torch.float32)
    frac = (x.abs() - lo.abs()) / (hi.abs() - lo.abs())  # exact: the gap is a power of two
    bits = random16(seed_t, x.numel(), x.device).reshape(x.shape)
    up = bits.to(torch.float32) < frac * 65536
    out = torch.where(up, away, toward_zero)
    return torch.where(torch.isfinite(hi) & ~x.isnan(), out, nearest)


def store_param(param: Tensor, value: Tensor, seed_t: int | None) -> None:
    """Write the float32 ``value`` into ``param``: stochastically for bf16/fp16 where ``seed_t``
    is given, else rounded to nearest (a plain copy)."""
    if seed_t is not None and param.dtype in ROUNDED:
        param.copy_(round_stochastic(value, param.dtype, seed_t).reshape(param.shape))
    elif value is not param:
        param.copy_(value.reshape(param.shape))
