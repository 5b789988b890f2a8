"""Fused GPU backends: Triton kernels that update every tensor of a step in one launch.

Note [fused GPU]
~~~~~~~~~~~~~~~~
A step reads and writes each element once at best: 28 bytes per fp32 parameter for
AdamW (read p, g, m, v; write p, m, v), 20 for Lion, so its floor is bytes / memory
bandwidth. What keeps implementations from it is not arithmetic but launches and
syncs: one kernel per tensor, or a host sync per tensor, over a model's hundreds of
tensors of every size. Here:

* One launch per (parameter dtype, state dtype) per parameter group covers all
  its tensors. The launch grid is a list of blocks of ``BLOCK`` elements; a small
  table in device memory gives, for each tensor, the addresses of its parameter,
  gradient and states (and AdamW's step counter) and its size, and for each block
  its tensor and first element. A 4-element bias and a 65 M-element embedding
  cost the same one launch (one more for each other pattern of 16-byte alignment
  among its tensors' streams: Note [alignment]).
* The tables depend only on those addresses and sizes. They are built on the
  host, copied with a non-blocking copy from pinned memory (no host sync), and
  kept with their group (Note [launch plans]): in a training loop the caching
  allocator hands the gradients the same memory each step, so after the first
  step nothing is rebuilt or copied; and a step captured in a CUDA graph
  replays the same tables.
* The learning rate may be a tensor on the device and AdamW's step counts live
  on the device (``state["step"]``), so bias corrections are computed in the
  kernel: nothing in ``step()`` reads a value back to the host. A learning rate
  that is a CPU tensor (``torch.compile``'s recipe, ``lr=torch.tensor(1e-3)``) is
  read on the host, where no device waits for it, and passed as a float lr is: the
  same argument, so the same bits (copying it to the device would be a blocking
  copy from pageable memory at every launch). Under CUDA graph capture it is
  refused with one line: the graph would replay the value it had when captured.
* ``torch.amp.GradScaler``: with ``grad_scale`` the kernel divides the gradient
  by it; with ``found_inf`` (a device flag) every block returns before writing
  anything, and the step counters are put back: the step is skipped with
  nothing changed, without a sync.
* Math in float32 whatever the storage (fp32, bf16 or fp16 parameters; fp32 or
  bf16 states), rounded once into each stored value, to nearest even; or, for
  bf16/fp16 parameters given ``rounding_seeds``, stochastically (Note [stochastic
  rounding] in _rounding.py; ``ROUND``, a compile-time flag: without seeds the kernels
  are unchanged). The seeds change every step, so they travel beside the cached
  tables, one int64 a tensor copied from pinned memory; the random bits of an
  element are a hash of its tensor's seed and its offset in the tensor's memory,
  whatever block or launch updates it. That offset is the element's index in
  ``_rounding.round_stochastic``'s (logical) order where the tensor is contiguous; for
  other dense layouts the bits are as random, but not the reference's.
* No autotuning: a block is 2048 elements (x 4 warps: 16 per thread, four
  16-byte loads per fp32 stream), so nothing ever runs twice on the same data.

The element-wise math is the same as the references' (docstrings of AdamW and
Lion) and is tested against them at every step, in CI through Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors) and on a GPU for real.

Note [launch plans]
~~~~~~~~~~~~~~~~~~~
A group's launches and their tables (its *plan*) are kept with the group: under the
identity of its first state tensor (``exp_avg``, or the 8-bit codes), which is ours
and lives as long as the group's state, and dropped with it (``weakref.finalize``).
Each step compares the signature of the step's tensors (every address, size, dtype
and device, read with C-level maps) with the plan's, and rebuilds the plan only
where it differs: one group whose gradients moved rebuilds its own tables, none
other. (A cache of recent plans keyed by the signature alone would hold a fixed
number of groups: one more group than it holds, as layer-wise learning rates make,
and every group would be rebuilt every step.) Where only addresses changed
(gradients that the allocator places elsewhere from one step to the next) the
rebuild makes the tensor table, a row a tensor, and keeps the block table, which
depends on the sizes alone and is the large one: a row per 2048 elements, tens of
MiB for a 7B model. A CUDA graph captured over a step reads the tables it was
captured with at every replay, so tables launched under capture are not freed
when their group's plan is rebuilt: the new plan keeps them (``_Plan.kept``), and
the pinned host copies of tables built during capture, from which each replay
copies, as long as the group's state lives.

Note [alignment]
~~~~~~~~~~~~~~~~
A 16-byte vector load needs a 16-byte aligned address, which the kernel must know
when it is compiled. The host checks every tensor's addresses and each launch takes
tensors of one pattern: ``ALIGNED``, a compile-time mask with a bit per stream (bit k:
the k-th of parameter, gradient, states), so that each aligned stream loads and
stores vectors whatever the others do. What puts a tensor off a boundary is nearly
always its gradient alone, a view into a flat buffer at an odd offset (DDP's
``gradient_as_bucket_view``); the parameter and our states keep their vectors and
only the gradient's loads are scalar. (A scalar head up to the next boundary and a
vector body would align one stream at the cost of the others, which start aligned:
each address has its own offset from a boundary.) The 8-bit kernels keep one launch
per dtype and choose on the device, per tensor, from three compiled variants: every
stream aligned, all but the gradient, none (also where its rows do not start at
multiples of 16 elements).

Note [8-bit kernels]
~~~~~~~~~~~~~~~~~~~~
``adamw8bit`` and ``lion8bit`` update tensors with 8-bit states (Note [8-bit states]
in _8bit.py), as the launches above: one per group and parameter dtype, a table row
per tensor (its addresses, its rows x cols, blocks per row, and which of its
streams may be read as vectors, Note [alignment]), a program per
``PER_PROGRAM`` = 4 consecutive blocks of 256 values of one tensor. Block q of a
tensor is row ``q // per_row``, values ``256 (q % per_row) ..`` of it (the last
block of a row masked), and its scales sit at offset q; the program holds its
blocks as a [4, 256] tile: it decodes, updates, takes each block's largest
magnitude (a row of the tile), encodes and stores, reading and writing each value
once. The largest magnitude is taken over the finite values, the infinities and
NaNs found by comparisons and counted apart: a block with one is special (its
scale negated, its finite values on fewer levels, Note [8-bit states]), the
same on every device whatever its max instruction does with a NaN.

The update is the reference's (``_single_tensor_adamw8bit``, ``_single_tensor_lion8bit``)
operation for operation, in its order, each correctly rounded: divisions ``div_rn``,
square roots ``sqrt_rn``, fused multiply-adds exactly where torch's own kernels fuse
(``lerp``: ATen's vector kernel and CUDA's compute ``w (b - a) + a`` in one rounding;
``addcmul``'s ``(w g) g + v``), and no others (the kernels are compiled with
``enable_fp_fusion=False``); scalars as the reference rounds them: float64 on the
host there, rounded once to float32 (``1 - lr wd``, ``-lr / (1 - beta1^t)``:
the learning rate and weight decay are float64 arguments, the bias corrections
float64 on the device). So the kernels equal the reference bit for bit wherever the
reference's own operations are correctly rounded (in the interpreter, with numpy's;
on a GPU, with its IEEE instructions). Two are not: torch's CPU float32 ``sqrt``
(its x86 vector kernel is within 0.75 ulp, and misses the correctly rounded value
for about one value in six), and torch's CUDA division by a Python number (a
multiplication by its reciprocal: ``r / sqrt(1 - beta2^t)``; the codes' quotients divide
two tensors, _8bit._units). Against those the kernels' scales and parameters are
within an ulp a step and their codes within 1 (nearly always equal);
tests/test_8bit_triton.py checks both. (One more, in principle: the bias corrections
are ``1 - exp(t ln beta)`` in float64 where the reference has Python's ``1 - beta**t``;
they differ in the last bits of a float64 at most, which changes their float32
rounding only where it falls within those bits of a tie.)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _8bit, _rounding
from ._tensors import is_dtensor, local

__all__ = ["BLOCK", "SUPPORTED", "adamw", "adamw8bit", "lion", "lion8bit"]

BLOCK = 2048
NUM_WARPS = 4
TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# (parameter dtype, state dtype) pairs the kernels take (Note [backends]); the rest go the foreach way
SUPPORTED = {(p, s) for p in TL for s in (torch.float32, torch.bfloat16)}


@triton.jit
def store(ptr, offs, mask, x, DTYPE: tl.constexpr):
    """Store float32 ``x`` as DTYPE, rounded to nearest even (bf16 by hand: the same
    result as the hardware's conversion, and Triton's interpreter would truncate)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(x != x, 0x7FC0, r).to(tl.uint16)  # nan stays nan
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, r, mask=mask)
    else:
        tl.store(ptr + offs, x.to(DTYPE), mask=mask)


@triton.jit
def _gradient(g, grad_scale_ptr, SCALED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient as the update takes it: divided by GradScaler's scale where SCALED (rounded
    as torch's division), negated where MAXIMIZE."""
    if SCALED:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _mix32(x):
    """``_rounding.mix32`` on uint32 values: the products wrap modulo 2^32, as its ``& 0xFFFFFFFF``."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x1B873593, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round_stochastic(ptr, offs, mask, x, seed, DTYPE: tl.constexpr):
    """Store float32 ``x`` as bf16/fp16, rounded stochastically: ``_rounding.round_stochastic`` bit
    for bit (Note [stochastic rounding]). ``offs``: the elements' indices in their tensor."""
    r16 = _mix32(offs.to(tl.uint32) ^ seed) >> 16  # 16 random bits, _rounding.random16
    u16 = ptr.to(tl.pointer_type(tl.uint16))
    if DTYPE == tl.bfloat16:
        # the value toward zero is x's upper half; frac * 65536 is exactly x's lower half
        u = x.to(tl.uint32, bitcast=True)
        lo = u & 0xFFFF0000
        out = tl.where(r16 < (u & 0xFFFF), lo + 0x10000, lo) >> 16
        # to nearest (even) where the value above is infinite: |lo| the largest finite bf16, inf, nan
        nearest = tl.where(x != x, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
        out = tl.where((u & 0x7FFFFFFF) >= 0x7F7F0000, nearest, out)
        tl.store(u16 + offs, out.to(tl.uint16), mask=mask)
    else:
        nearest = x.to(tl.float16)  # to nearest even
        nb = nearest.to(tl.uint16, bitcast=True).to(tl.uint32)
        # the value toward zero and the next one away from it (sign-magnitude bits: -1, +1)
        lo = tl.where(tl.abs(nearest.to(tl.float32)) > tl.abs(x), nb - 1, nb).to(tl.uint16)
        hi = (lo.to(tl.uint32) + 1).to(tl.uint16)
        lo_f = lo.to(tl.float16, bitcast=True).to(tl.float32)
        hi_f = hi.to(tl.float16, bitcast=True).to(tl.float32)
        frac = tl.div_rn(tl.abs(x) - tl.abs(lo_f), tl.abs(hi_f) - tl.abs(lo_f))  # exact: the gap is a power of 2
        out = tl.where(r16.to(tl.float32) < frac * 65536.0, hi, lo)
        # to nearest where the value above is infinite: |lo| the largest finite fp16, inf, nan
        out = tl.where((lo.to(tl.uint32) & 0x7FFF) >= 0x7BFF, nb.to(tl.uint16), out)
        tl.store(u16 + offs, out, mask=mask)


@triton.jit
def _store_param(ptr, offs, mask, x, seed, DTYPE: tl.constexpr, ROUND: tl.constexpr):
    """Store the float32 parameter ``x``: stochastically where ROUND (bf16/fp16 only), else to nearest."""
    if ROUND:
        _round_stochastic(ptr, offs, mask, x, seed, DTYPE)
    else:
        store(ptr, offs, mask, x, DTYPE)


@triton.jit
def _seed(seeds_ptr, t, ROUND: tl.constexpr):
    """Tensor ``t``'s 32-bit rounding seed (0 where nothing rounds stochastically)."""
    if ROUND:
        seed = tl.load(seeds_ptr + t).to(tl.uint32)
    else:
        seed = tl.full((), 0, tl.uint32)
    return seed


@triton.jit
def _address(entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor address stored at ``entry`` of the table, as a pointer to DTYPE. ALIGNED (true or
    false, or a bit of a launch's mask, Note [alignment]): the host checked it is a multiple of 16
    bytes, so loads and stores can be 16-byte vectors."""
    ptr = tl.load(entry).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula: a + w (b - a) for w < 0.5, else b - (1 - w)(b - a)."""
    if w < 0.5:
        r = a + w * (b - a)
    else:
        r = b - (1 - w) * (b - a)
    return r


@triton.jit
def _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, lr, bc1, bc2_sqrt, grad_scale_ptr,
                    weight_decay, beta2, w1, w2, eps, seed,
                    P: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr, MAXIMIZE: tl.constexpr,
                    ROUND: tl.constexpr):
    """The AdamW update of one block (mask None: a whole block, vector loads)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    g = _gradient(g, grad_scale_ptr, SCALED, MAXIMIZE)

    p = p * (1 - lr * weight_decay)                           # theta (1 - lr wd)
    m = _lerp(m, g, w1)                                       # m_t = b1 m + (1 - b1) g
    v = v * beta2 + w2 * g * g                                # v_t = b2 v + (1 - b2) g^2
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps          # sqrt(v_hat) + eps
    p = p + tl.div_rn((-lr / bc1) * m, denom)                 # theta - lr m_hat / denom

    _store_param(p_ptr, offs, mask, p, seed, P, ROUND)
    store(m_ptr, offs, mask, m, S)
    store(v_ptr, offs, mask, v, S)


@triton.jit
def _adamw_kernel(table, blocks, lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, log_betas, seeds_ptr,
                  weight_decay, beta2, w1, w2, eps,
                  P: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, LR_TENSOR: tl.constexpr,
                  SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, CORRECT_BIAS: tl.constexpr,
                  MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr = False):
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    block = tl.program_id(0)
    t = tl.load(blocks + 2 * block)
    start = tl.multiple_of(tl.load(blocks + 2 * block + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    row = table + 6 * t                   # p, g, m, v, step, numel
    p_ptr = _address(row, P, ALIGNED & 1)  # ALIGNED: a bit per stream (Note [alignment])
    g_ptr = _address(row + 1, P, ALIGNED & 2)
    m_ptr = _address(row + 2, S, ALIGNED & 4)
    v_ptr = _address(row + 3, S, ALIGNED & 8)
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))  # already counted
    numel = tl.load(row + 5)
    lr = tl.load(lr_ptr).to(tl.float32) if LR_TENSOR else lr_value
    seed = _seed(seeds_ptr, t, ROUND)
    if CORRECT_BIAS:  # in float64: 1 - b2^t in float32 would lose the digits that matter
        t = step.to(tl.float64)
        bc1 = (1.0 - tl.exp(t * tl.load(log_betas))).to(tl.float32)                   # 1 - b1^t
        bc2_sqrt = tl.sqrt_rn((1.0 - tl.exp(t * tl.load(log_betas + 1))).to(tl.float32))  # sqrt(1 - b2^t)
    else:
        bc1 = 1.0
        bc2_sqrt = 1.0
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be vectors
        _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, lr, bc1, bc2_sqrt, grad_scale_ptr,
                        weight_decay, beta2, w1, w2, eps, seed, P, S, SCALED, MAXIMIZE, ROUND)
    else:                       # the tensor's last, partial block
        _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, lr, bc1, bc2_sqrt, grad_scale_ptr,
                        weight_decay, beta2, w1, w2, eps, seed, P, S, SCALED, MAXIMIZE, ROUND)


@triton.jit
def _lion_elements(p_ptr, g_ptr, m_ptr, offs, mask, lr, grad_scale_ptr, weight_decay, w1, w2, seed,
                   P: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr, MAXIMIZE: tl.constexpr,
                   ROUND: tl.constexpr):
    """The Lion update of one block (mask None: a whole block, vector loads)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    g = _gradient(g, grad_scale_ptr, SCALED, MAXIMIZE)

    c = _lerp(m, g, w1)                                       # c = b1 m + (1 - b1) g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch.sign: 0 at 0 and at nan
    p = p * (1 - lr * weight_decay) - lr * sign               # theta (1 - lr wd) - lr sign(c)
    m = _lerp(m, g, w2)                                       # m_t = b2 m + (1 - b2) g

    _store_param(p_ptr, offs, mask, p, seed, P, ROUND)
    store(m_ptr, offs, mask, m, S)


@triton.jit
def _lion_kernel(table, blocks, lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, seeds_ptr, weight_decay, w1, w2,
                 P: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, LR_TENSOR: tl.constexpr,
                 SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                 ROUND: tl.constexpr = False):
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    block = tl.program_id(0)
    t = tl.load(blocks + 2 * block)
    start = tl.multiple_of(tl.load(blocks + 2 * block + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    row = table + 4 * t                   # p, g, m, numel
    p_ptr = _address(row, P, ALIGNED & 1)  # ALIGNED: a bit per stream (Note [alignment])
    g_ptr = _address(row + 1, P, ALIGNED & 2)
    m_ptr = _address(row + 2, S, ALIGNED & 4)
    numel = tl.load(row + 3)
    lr = tl.load(lr_ptr).to(tl.float32) if LR_TENSOR else lr_value
    seed = _seed(seeds_ptr, t, ROUND)
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be vectors
        _lion_elements(p_ptr, g_ptr, m_ptr, offs, None, lr, grad_scale_ptr, weight_decay, w1, w2, seed,
                       P, S, SCALED, MAXIMIZE, ROUND)
    else:                       # the tensor's last, partial block
        _lion_elements(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, grad_scale_ptr, weight_decay, w1, w2, seed,
                       P, S, SCALED, MAXIMIZE, ROUND)


# ----- 8-bit states (Note [8-bit states] in _8bit.py, Note [8-bit kernels]) -------------------


@triton.jit
def _store_signed(codes_ptr, scales_ptr, offs, q, mask, real, m):
    """Encode the first moment ``m`` [B, QBLOCK] (_8bit.encode_signed) and store its int8 codes
    and its blocks' scales."""
    c, scale = _encode(tl.abs(m), mask, 0, 127, 126, 127.0, 128.0, False)
    c = tl.where(m > 0, c, tl.where(m < 0, -c, tl.where(m != m, -128.0, 0.0)))  # m's sign; -128 for nan
    tl.store(codes_ptr + offs, c.to(tl.int8), mask=mask)
    tl.store(scales_ptr + q, scale, mask=real)


@triton.jit
def lerp_fma(a, b, w):
    """torch.lerp as torch's CPU vector kernel and its CUDA kernel compute it: one fused
    multiply-add, w (b - a) + a for w < 0.5, else (w - 1)(b - a) + b."""
    if w < 0.5:
        r = tl.fma(b - a, w, a)
    else:
        r = tl.fma(b - a, w - 1.0, b)
    return r


@triton.jit
def _decode_signed(codes, scale):
    """int8 codes [B, QBLOCK], float32 scales [B] -> c |c| (|scale| / 127^2), or 126^2 and the
    infinities and NaNs of a special block (a negative scale), as _8bit.decode_signed."""
    c = codes.to(tl.float32)
    negative = scale.to(tl.int32, bitcast=True) < 0
    x = (c * tl.abs(c)) * tl.div_rn(tl.abs(scale), tl.where(negative, 15876.0, 16129.0))[:, None]
    special = negative[:, None]
    x = tl.where(special & (c == 127.0), float("inf"), x)
    x = tl.where(special & (c == -127.0), float("-inf"), x)
    return tl.where(special & (c == -128.0), float("nan"), x)


@triton.jit
def _decode_root(codes, scale):
    """uint8 codes [B, QBLOCK], float32 scales [B] -> c^2 (|scale| / 255^2), or 253^2 and the
    infinities and NaNs of a special block (a negative scale), as _8bit.decode_root."""
    c = codes.to(tl.float32)
    negative = scale.to(tl.int32, bitcast=True) < 0
    r = (c * c) * tl.div_rn(tl.abs(scale), tl.where(negative, 64009.0, 65025.0))[:, None]
    special = negative[:, None]
    r = tl.where(special & (c == 255.0), float("inf"), r)
    return tl.where(special & (c == 254.0), float("nan"), r)


@triton.jit
def _encode(a, mask, seed, LEVELS: tl.constexpr, SPECIAL_LEVELS: tl.constexpr, INF_CODE: tl.constexpr,
            NAN_CODE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """|x| or r [B, QBLOCK] (>= 0, inf or nan) -> (codes as float32, scales [B]), as
    _8bit.encode_signed / encode_root: over each row's largest finite value, from
    u = levels^2 a / top as _8bit._units computes it, floor(sqrt(u) + 0.5) (_8bit._nearest_code),
    or where STOCHASTIC the second moment's stochastic code with ``seed``. A row that holds an
    infinity or a nan is special (Note [8-bit states]): its scale negated, SPECIAL_LEVELS for its
    finite values, INF_CODE and NAN_CODE for the others (found by comparisons, not by the max
    instruction, whose handling of a nan differs between devices)."""
    a = tl.where(mask, a, 0.0)
    bad = (a != a) | (a == float("inf"))
    a_finite = tl.where(bad, 0.0, a)
    top = tl.minimum(tl.max(a_finite, axis=1), 3.4028232635611926e38)  # _8bit.MAX_SCALE
    special = tl.max(bad.to(tl.int32), axis=1) > 0
    scale = tl.where(special, -top, top)
    levels = tl.where(special, SPECIAL_LEVELS * 1.0, LEVELS * 1.0)
    levels2 = (levels * levels)[:, None]
    s = top[:, None]
    positive = s > 0
    k = tl.div_rn(levels * levels, tl.where(top > 0, top, 1.0))[:, None]
    u = tl.where(k < float("inf"), a_finite * k, tl.div_rn(a_finite, tl.where(positive, s, 1.0)) * levels2)
    u = tl.where(positive, u, 0.0)  # 0 where the largest finite value is 0
    if STOCHASTIC:  # lo = floor(x), x = sqrt(u), + 1 iff bits (hi^4 - lo^4) < (u^2 - lo^4) 65536: unbiased for a^2
        lo = tl.floor(tl.sqrt_rn(u))
        hi = lo + 1.0
        lo2 = lo * lo
        hi2 = hi * hi
        bits = (_mix32((a.to(tl.uint32, bitcast=True) >> 8) ^ seed) >> 16).to(tl.float32)
        c = lo + (bits * (hi2 * hi2 - lo2 * lo2) < (u * u - lo2 * lo2) * 65536.0).to(tl.float32)
        c = tl.minimum(c, levels[:, None])  # u may pass levels^2 by an ulp
    else:
        c = tl.floor(tl.sqrt_rn(u) + 0.5)
    c = tl.where(a == float("inf"), INF_CODE, c)
    return tl.where(a != a, NAN_CODE, c), scale


@triton.jit
def _lr64(lr_ptr, lr_value, LR_TENSOR: tl.constexpr):
    """The learning rate as a float64 tensor: the tensor's value, or the float64 argument (added
    to a float64 zero first: Triton's interpreter would make a float32 of a bare Python float
    that flows out of an ``if``)."""
    lr = lr_value + tl.zeros((), tl.float64)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    return lr


@triton.jit
def _blocks_of(entry, first, QBLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr, ALIGNED: tl.constexpr):
    """The blocks ``first ..`` of one tensor (rows x cols, blocks of QBLOCK values per row):
    their indices q (= their scales' offsets), which are real, each value's offset and mask."""
    cols = tl.load(entry)
    per_row = tl.load(entry + 1)   # ceil(cols / QBLOCK)
    n = tl.load(entry + 2)         # rows * per_row
    if ALIGNED != 0:  # every row starts at a multiple of 16 elements: vector accesses
        cols = tl.multiple_of(cols, 16)
    q = first + tl.arange(0, PER_PROGRAM)
    real = q < n
    row = q // per_row
    col = (q - row * per_row) * QBLOCK
    offs = (row * cols + col)[:, None] + tl.arange(0, QBLOCK)[None, :]
    mask = real[:, None] & (col[:, None] + tl.arange(0, QBLOCK)[None, :] < cols)
    return q, real, offs, mask


@triton.jit
def _adamw8bit_blocks(entry, first, seed, root_seed, decay, step_size, bc2_sqrt, grad_scale_ptr, beta2, w1, w2, eps,
                      P: tl.constexpr, QBLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr, SCALED: tl.constexpr,
                      MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr):
    """AdamW on PER_PROGRAM blocks of one tensor: _single_tensor_adamw8bit's operations in its order.
    ALIGNED: a bit per stream (p, g, m, v), or 0 (Note [alignment])."""
    p_ptr = _address(entry, P, ALIGNED & 1)
    g_ptr = _address(entry + 1, P, ALIGNED & 2)
    m_ptr = _address(entry + 2, tl.int8, ALIGNED & 4)
    v_ptr = _address(entry + 3, tl.uint8, ALIGNED & 8)
    m_scales = tl.load(entry + 4).to(tl.pointer_type(tl.float32))
    v_scales = tl.load(entry + 5).to(tl.pointer_type(tl.float32))
    q, real, offs, mask = _blocks_of(entry + 7, first, QBLOCK, PER_PROGRAM, ALIGNED)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _gradient(g, grad_scale_ptr, SCALED, MAXIMIZE)
    m = _decode_signed(tl.load(m_ptr + offs, mask=mask, other=0), tl.load(m_scales + q, mask=real, other=0.0))
    r = _decode_root(tl.load(v_ptr + offs, mask=mask, other=0), tl.load(v_scales + q, mask=real, other=0.0))
    v = r * r

    p = p * decay                                             # theta (1 - lr wd)
    m = lerp_fma(m, g, w1)                                   # m_t = b1 m + (1 - b1) g
    v = tl.fma(w2 * g, g, v * beta2)                          # v_t = b2 v + (1 - b2) g^2 (addcmul)
    r = tl.sqrt_rn(v)
    denom = tl.div_rn(r, bc2_sqrt) + eps                      # sqrt(v_hat) + eps
    p = p + tl.div_rn(step_size * m, denom)                   # theta - lr m_hat / denom (addcdiv)

    _store_signed(m_ptr, m_scales, offs, q, mask, real, m)
    c, scale = _encode(r, mask, root_seed, 255, 253, 255.0, 254.0, True)  # stochastic, unbiased for v
    c = tl.where(r > 0, tl.maximum(c, 1.0), c)                # a positive r never decodes to 0
    tl.store(v_ptr + offs, c.to(tl.uint8), mask=mask)
    tl.store(v_scales + q, scale, mask=real)
    _store_param(p_ptr, offs, mask, p, seed, P, ROUND)


@triton.jit
def _adamw8bit_kernel(table, blocks, lr_ptr, lr_value: tl.float64, weight_decay: tl.float64, grad_scale_ptr,
                      found_inf_ptr, log_betas, seeds_ptr, beta2, w1, w2, eps,
                      P: tl.constexpr, QBLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr, LR_TENSOR: tl.constexpr,
                      SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, CORRECT_BIAS: tl.constexpr,
                      MAXIMIZE: tl.constexpr, ROUND: tl.constexpr):
    """AdamW over 8-bit states, PER_PROGRAM blocks a program (Note [8-bit kernels])."""
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    program = tl.program_id(0)
    t = tl.load(blocks + 2 * program)
    first = tl.load(blocks + 2 * program + 1)
    entry = table + 11 * t  # p, g, m, v, m scales, v scales, step, cols, blocks a row, blocks, aligned
    step = tl.load(tl.load(entry + 6).to(tl.pointer_type(tl.float32)))  # already counted
    seed = _seed(seeds_ptr, t, ROUND)
    root_seed = _mix32(step.to(tl.uint32))  # of v's stochastic codes: _8bit.root_seed
    # the scalars as the reference's: float64 on the host there, rounded once to float32
    lr = _lr64(lr_ptr, lr_value, LR_TENSOR)
    if CORRECT_BIAS:
        tf = step.to(tl.float64)
        bc1 = 1.0 - tl.exp(tf * tl.load(log_betas))                                  # 1 - b1^t
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(tf * tl.load(log_betas + 1))).to(tl.float32)  # sqrt(1 - b2^t)
    else:
        bc1 = 1.0
        bc2_sqrt = 1.0
    decay = tl.cast(1.0 - lr * weight_decay, tl.float32)
    step_size = tl.cast(-lr / bc1, tl.float32)
    aligned = tl.load(entry + 10)  # Note [alignment]: the variants of _aligned_8bit
    if aligned == 15:    # every stream: vector accesses
        _adamw8bit_blocks(entry, first, seed, root_seed, decay, step_size, bc2_sqrt, grad_scale_ptr, beta2, w1, w2, eps,
                          P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 15, ROUND)
    elif aligned == 13:  # all but the gradient (a view at an odd offset, as DDP's buckets make)
        _adamw8bit_blocks(entry, first, seed, root_seed, decay, step_size, bc2_sqrt, grad_scale_ptr, beta2, w1, w2, eps,
                          P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 13, ROUND)
    else:
        _adamw8bit_blocks(entry, first, seed, root_seed, decay, step_size, bc2_sqrt, grad_scale_ptr, beta2, w1, w2, eps,
                          P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 0, ROUND)


@triton.jit
def _lion8bit_blocks(entry, first, seed, decay, lr, grad_scale_ptr, w1, w2,
                     P: tl.constexpr, QBLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr, SCALED: tl.constexpr,
                     MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr):
    """Lion on PER_PROGRAM blocks of one tensor: _single_tensor_lion8bit's operations in its order.
    ALIGNED: a bit per stream (p, g, m), or 0 (Note [alignment])."""
    p_ptr = _address(entry, P, ALIGNED & 1)
    g_ptr = _address(entry + 1, P, ALIGNED & 2)
    m_ptr = _address(entry + 2, tl.int8, ALIGNED & 4)
    m_scales = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
    q, real, offs, mask = _blocks_of(entry + 4, first, QBLOCK, PER_PROGRAM, ALIGNED)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _gradient(g, grad_scale_ptr, SCALED, MAXIMIZE)
    m = _decode_signed(tl.load(m_ptr + offs, mask=mask, other=0), tl.load(m_scales + q, mask=real, other=0.0))

    c = lerp_fma(m, g, w1)                                   # c = b1 m + (1 - b1) g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch.sign: 0 at 0 and at nan
    p = p * decay                                             # theta (1 - lr wd)
    p = p - sign * lr                                         # theta - lr sign(c)
    m = lerp_fma(m, g, w2)                                   # m_t = b2 m + (1 - b2) g

    _store_signed(m_ptr, m_scales, offs, q, mask, real, m)
    _store_param(p_ptr, offs, mask, p, seed, P, ROUND)


@triton.jit
def _lion8bit_kernel(table, blocks, lr_ptr, lr_value: tl.float64, weight_decay: tl.float64, grad_scale_ptr,
                     found_inf_ptr, seeds_ptr, w1, w2,
                     P: tl.constexpr, QBLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr, LR_TENSOR: tl.constexpr,
                     SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, MAXIMIZE: tl.constexpr, ROUND: tl.constexpr):
    """Lion over an 8-bit momentum, PER_PROGRAM blocks a program (Note [8-bit kernels])."""
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    program = tl.program_id(0)
    t = tl.load(blocks + 2 * program)
    first = tl.load(blocks + 2 * program + 1)
    entry = table + 8 * t  # p, g, m, m scales, cols, blocks a row, blocks, aligned
    seed = _seed(seeds_ptr, t, ROUND)
    lr = _lr64(lr_ptr, lr_value, LR_TENSOR)
    decay = tl.cast(1.0 - lr * weight_decay, tl.float32)
    lr32 = lr.to(tl.float32)
    aligned = tl.load(entry + 7)  # Note [alignment]: the variants of _aligned_8bit
    if aligned == 7:    # every stream: vector accesses
        _lion8bit_blocks(entry, first, seed, decay, lr32, grad_scale_ptr, w1, w2,
                         P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 7, ROUND)
    elif aligned == 5:  # all but the gradient (a view at an odd offset, as DDP's buckets make)
        _lion8bit_blocks(entry, first, seed, decay, lr32, grad_scale_ptr, w1, w2,
                         P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 5, ROUND)
    else:
        _lion8bit_blocks(entry, first, seed, decay, lr32, grad_scale_ptr, w1, w2,
                         P, QBLOCK, PER_PROGRAM, SCALED, MAXIMIZE, 0, ROUND)


# ----- the launch plans: which tensors, in which tables (Note [launch plans]) -------------

# a launch of the float kernels: parameter and state dtypes, aligned streams (Note [alignment]), the
# indices of its tensors in the step's lists, its tensor table, block table and number of blocks
Launch = tuple[torch.dtype, torch.dtype, int, list[int], Tensor, Tensor, int]
_DTYPE = operator.attrgetter("dtype")
# a launch's tensors (their indices in the step's lists) and tables: tensor table, block table, blocks
Built = dict[tuple, tuple[list[int], Tensor, Tensor, int]]


class _Plan:
    """One group's launches and the signature of the tensors they were built for (Note [launch plans])."""

    __slots__ = ("built", "captured", "kept", "launches", "signature")

    def __init__(self, signature: tuple, launches: list, built: Built, kept: list) -> None:
        self.signature = signature  # (addresses, the rest: sizes, dtypes, devices)
        self.launches = launches
        self.built = built     # the launches' tables by launch key
        self.captured = False  # launched while a CUDA graph was captured: the graph reads these tables
        self.kept = kept       # what graphs captured before may still read: older tables, host copies


# (kind, id of the group's first state tensor) -> the group's plan; an entry goes with that tensor
_PLANS: dict[tuple[str, int], _Plan] = {}


def _cached(kind: str, owner: Tensor, signature: tuple[tuple, tuple],
            build: Callable[[list[Tensor], Built], tuple[list, Built]]) -> _Plan:
    """The plan of the group whose first state tensor is ``owner``: the one it has while the
    signature repeats, else ``build(kept, reusable)``'s: it adds to ``kept`` what a graph being
    captured will read, and takes block tables from ``reusable`` (the old plan's, where only
    addresses changed)."""
    key = (kind, id(owner))
    plan = _PLANS.get(key)
    if plan is not None and plan.signature == signature:
        return plan
    kept = [] if plan is None else plan.kept + ([plan.launches] if plan.captured else [])
    reusable = plan.built if plan is not None and plan.signature[1] == signature[1] else {}
    launches, built = build(kept, reusable)
    if plan is None:  # when the group's state goes, so does its plan (its id may next be another tensor's)
        weakref.finalize(owner, _PLANS.pop, key, None).atexit = False
    plan = _PLANS[key] = _Plan(signature, launches, built, kept)
    return plan


def _build(groups: dict[tuple, tuple[list[int], list[list[int]]]], kept: list[Tensor], reusable: Built,
           per_program: int = BLOCK, size: int = -1) -> Built:
    """The tables of each launch of ``groups`` (launch key, its device first -> the indices of its
    tensors and their table rows): a launch of the same tensors as one of ``reusable`` (whose
    sizes were these) keeps that block table, the larger one (Note [launch plans])."""
    built = {}
    for key, (idx, rows) in groups.items():
        old = reusable.get(key)
        same = old[2:] if old is not None and old[0] == idx else None
        built[key] = (idx, *_tables(rows, key[0], kept, per_program, size, same))
    return built


def _capturing(device: torch.device) -> bool:
    """Whether launches on ``device`` are being captured into a CUDA graph (which replays the
    tables and the scalars they get now)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tables(rows: list[list[int]], device: torch.device, kept: list[Tensor], per_program: int = BLOCK,
            size: int = -1, same: tuple[Tensor, int] | None = None) -> tuple[Tensor, Tensor, int]:
    """(the tensor table, the block table, the number of blocks) for these rows of addresses
    and sizes (size last, or at ``size``), copied to ``device`` without a host sync; ``same``:
    the block table and its blocks, where they are known. A program takes ``per_program`` of a
    tensor's units (elements; for 8-bit states, blocks of 256 values)."""
    table = _to_device(torch.tensor(rows, dtype=torch.int64), device, kept)
    if same is not None:
        return table, *same
    counts = torch.tensor([-(-row[size] // per_program) for row in rows], dtype=torch.int64)
    n_blocks = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(n_blocks) - first[owner]) * per_program
    blocks = torch.stack([owner, start], 1).contiguous()
    return table, _to_device(blocks, device, kept), n_blocks


def _to_device(t: Tensor, device: torch.device, kept: list[Tensor]) -> Tensor:
    """``t`` copied to ``device`` from pinned memory, asynchronously (no host sync)."""
    if device.type == "cpu":
        return t
    host = t.pin_memory()
    with on(device):
        if _capturing(device):  # the graph copies from it at every replay: it lives with the plan
            kept.append(host)
    return host.to(device, non_blocking=True)


def _aligned(addresses: list[int]) -> int:
    """The streams (bit k: ``addresses[k]``) that start at a multiple of 16 bytes (Note [alignment])."""
    return sum(1 << k for k, a in enumerate(addresses) if a % 16 == 0)


def _plan(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], counters: list[Tensor] | None
          ) -> _Plan:
    """The launches of a step: one per device, parameter dtype, state dtype and aligned streams,
    with its tables. The dispatcher (``_dispatch.route``) sends only tensors the kernels take.

    This runs every step, so the group's plan is kept (Note [launch plans]) with a signature that
    is cheap to compute (C-level maps over the lists): every address, size and the dtypes. In a
    training loop the signature repeats from the second step on and nothing is rebuilt or copied."""
    if not params:
        return _Plan(((), ()), [], {}, [])
    lists = [params, grads, *states, *([counters] if counters is not None else [])]
    if is_dtensor(params[0]):  # FSDP2: the local shards
        lists = [list(map(local, lst)) for lst in lists]
    signature = (  # states and counters are ours: new ones have new addresses
        tuple(itertools.chain(*[map(Tensor.data_ptr, lst) for lst in lists])),
        tuple(itertools.chain(map(Tensor.numel, lists[0]), map(_DTYPE, lists[0]), map(_DTYPE, lists[2]),
                              map(operator.attrgetter("device"), lists[0]))),
    )

    def build(kept: list[Tensor], reusable: Built) -> tuple[list[Launch], Built]:
        groups: dict[tuple[torch.device, torch.dtype, torch.dtype, int], tuple[list[int], list[list[int]]]] = {}
        n_ts = 2 + len(states)  # parameter, gradient, states; then the step counter, if any
        for i, ts in enumerate(zip(*lists)):
            row = [t.data_ptr() for t in ts]
            key = (ts[0].device, ts[0].dtype, ts[2].dtype, _aligned(row[:n_ts]))
            idx, rows = groups.setdefault(key, ([], []))
            idx.append(i)
            rows.append(row + [ts[0].numel()])
        built = _build(groups, kept, reusable)
        return [(pdt, sdt, aligned, *tables) for (_, pdt, sdt, aligned), tables in built.items()], built

    return _cached("float", states[0][0], signature, build)


def _host_lr(lr: float | Tensor, device: torch.device) -> float | None:
    """The learning rate as a Python float where the launch should take it so: a number, or a CPU
    tensor for a GPU launch (read on the host, where no device waits; copying it would be a blocking
    copy from pageable memory every launch); None for a tensor the kernel loads on its device."""
    if not isinstance(lr, Tensor):
        return float(lr)
    if lr.device.type != "cpu" or device.type == "cpu":
        return None
    if _capturing(device):
        raise RuntimeError("lr is a CPU tensor, and a CUDA graph would replay the value it has now whatever a "
                           "scheduler writes there later: give lr as a tensor on the GPU, e.g. "
                           f"torch.tensor({float(lr)!r}, device={str(device)!r})")
    return float(lr)


def _lr_args(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float, bool]:
    """(the tensor the kernel loads, else the float it takes; which) for the float kernels: a float
    is a float32 argument, as a float32 tensor is loaded (Note [fused GPU])."""
    value = _host_lr(lr, device)
    if value is None:
        return lr.to(device=device, dtype=torch.float32), 0.0, True
    return None, value, False


def _amp_args(grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device
              ) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's scale and flag where the launch reads them (no copy where they already are)."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in (grad_scale, found_inf))


def on(device: torch.device) -> Any:
    """Launch on ``device``'s GPU (Triton launches on the current one)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_LOG_BETAS: dict[tuple[str, int, float, float], Tensor] = {}


def _log_betas(beta1: float, beta2: float, device: torch.device) -> Tensor:
    """(ln beta1, ln beta2) in float64 on ``device``, for the bias corrections in the kernel;
    made once per device and betas (pinned, non-blocking: no sync)."""
    key = (device.type, device.index or 0, beta1, beta2)
    if key not in _LOG_BETAS:
        values = torch.tensor([math.log(b) if b > 0 else -math.inf for b in (beta1, beta2)], dtype=torch.float64)
        _LOG_BETAS[key] = values if device.type == "cpu" else values.pin_memory().to(device, non_blocking=True)
    return _LOG_BETAS[key]


def _seeds(rounding_seeds: Sequence[int] | None, pdt: torch.dtype, idx: list[int], device: torch.device
           ) -> tuple[Tensor | None, bool]:
    """(the rounding seeds of a launch's tensors, in its table's order, on ``device``; whether it
    rounds stochastically): bf16/fp16 parameters with seeds (Note [stochastic rounding]). The seeds
    change every step, so they travel apart from the cached tables (pinned, non-blocking)."""
    if rounding_seeds is None or pdt not in _rounding.ROUNDED:
        return None, False
    seeds = torch.tensor([rounding_seeds[i] & 0xFFFFFFFF for i in idx], dtype=torch.int64)
    if device.type != "cpu":
        seeds = seeds.pin_memory().to(device, non_blocking=True)
    return seeds, True


def f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even), as torch rounds a scalar for a float32 op: the
    kernels get these exact values on every device (Triton's interpreter computes with the Python
    floats themselves, a GPU with float32 arguments)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ----- the backends (the signatures of adamw's and lion's backends, Note [backends]) --------

def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
          weight_decay: float, correct_bias: bool, maximize: bool, rounding_seeds: Sequence[int] | None = None,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused AdamW step (the signature of adamw's backends). ``rounding_seeds``: one 32-bit
    seed per tensor; bf16/fp16 parameters are then rounded stochastically (Note [stochastic rounding])."""
    plan = _plan(params, grads, [exp_avgs, exp_avg_sqs], state_steps)
    for pdt, sdt, aligned, idx, table, blocks, n_blocks in plan.launches:
        device = params[idx[0]].device
        if not n_blocks:
            continue
        with on(device):
            lr_t, lr_value, lr_tensor = _lr_args(lr, device)
            scale, inf = _amp_args(grad_scale, found_inf, device)
            seeds, rounds = _seeds(rounding_seeds, pdt, idx, device)
            plan.captured = plan.captured or _capturing(device)
            _adamw_kernel[(n_blocks,)](
                table, blocks, lr_t, lr_value, scale, inf, _log_betas(beta1, beta2, device), seeds,
                weight_decay, beta2, 1 - beta1, 1 - beta2, eps,
                P=TL[pdt], S=TL[sdt], BLOCK=BLOCK, LR_TENSOR=lr_tensor, SCALED=grad_scale is not None,
                SKIPPABLE=found_inf is not None, CORRECT_BIAS=correct_bias, MAXIMIZE=maximize, ALIGNED=aligned,
                ROUND=rounds,
                num_warps=NUM_WARPS, enable_fp_fusion=True,  # fused multiply-adds, as nvcc compiles torch's
            )


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
         beta1: float, beta2: float, weight_decay: float, maximize: bool, rounding_seeds: Sequence[int] | None = None,
         grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused Lion step (the signature of lion's backends); ``rounding_seeds`` as :func:`adamw`'s."""
    plan = _plan(params, grads, [exp_avgs], None)
    for pdt, sdt, aligned, idx, table, blocks, n_blocks in plan.launches:
        device = params[idx[0]].device
        if not n_blocks:
            continue
        with on(device):
            lr_t, lr_value, lr_tensor = _lr_args(lr, device)
            scale, inf = _amp_args(grad_scale, found_inf, device)
            seeds, rounds = _seeds(rounding_seeds, pdt, idx, device)
            plan.captured = plan.captured or _capturing(device)
            _lion_kernel[(n_blocks,)](
                table, blocks, lr_t, lr_value, scale, inf, seeds, weight_decay, 1 - beta1, 1 - beta2,
                P=TL[pdt], S=TL[sdt], BLOCK=BLOCK, LR_TENSOR=lr_tensor, SCALED=grad_scale is not None,
                SKIPPABLE=found_inf is not None, MAXIMIZE=maximize, ALIGNED=aligned, ROUND=rounds,
                num_warps=NUM_WARPS, enable_fp_fusion=True,  # fused multiply-adds, as nvcc compiles torch's
            )


# ----- 8-bit states: the launch plan and the backends (Note [8-bit kernels]) ---------------

PER_PROGRAM = 4       # blocks of 256 values a program updates: 1024 values, 8 a thread
NUM_WARPS_8BIT = 4
EIGHT_BIT = tuple(TL)  # parameter dtypes the 8-bit kernels take


def _aligned_8bit(cols: int, addresses: list[int]) -> int:
    """A tensor's alignment in an 8-bit table: its aligned streams (as :func:`_aligned`) where that is
    one of the kernels' variants, every stream or all but the gradient, and its rows start at
    multiples of 16 elements; else 0 (Note [alignment])."""
    every = (1 << len(addresses)) - 1
    mask = _aligned(addresses) if cols % 16 == 0 else 0
    return mask if mask in (every, every & ~2) else 0


def _plan_8bit(params: list[Tensor], grads: list[Tensor], codes: list[list[Tensor]], scales: list[list[Tensor]],
               counters: list[Tensor] | None) -> _Plan:
    """The launches of an 8-bit step: one per device and parameter dtype, with its tables (kept
    as :func:`_plan`'s). A table row: the addresses of the parameter, gradient, codes, scales (and
    step counter), then the parameter's cols, blocks per row, blocks, and its alignment
    (:func:`_aligned_8bit`)."""
    if not params:
        return _Plan(((), ()), [], {}, [])
    lists = [params, grads, *codes, *scales, *([counters] if counters is not None else [])]
    if is_dtensor(params[0]):  # FSDP2: the local shards (rows of the parameter)
        lists = [list(map(local, lst)) for lst in lists]
    signature = (
        tuple(itertools.chain(*[map(Tensor.data_ptr, lst) for lst in lists])),
        tuple(itertools.chain(map(operator.attrgetter("shape"), lists[0]), map(_DTYPE, lists[0]),
                              map(operator.attrgetter("device"), lists[0]))),
    )

    def build(kept: list[Tensor], reusable: Built) -> tuple[list[tuple[torch.dtype, list[int], Tensor, Tensor, int]],
                                                            Built]:
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[list[int]]]] = {}
        n_values = 2 + len(codes)  # parameter, gradient, codes: the element-wise streams
        for i, ts in enumerate(zip(*lists)):
            row = [t.data_ptr() for t in ts]
            rows, cols = _8bit.rows_cols(ts[0].shape)
            per_row = -(-cols // _8bit.BLOCK)
            idx, table = groups.setdefault((ts[0].device, ts[0].dtype), ([], []))
            idx.append(i)
            table.append(row + [cols, per_row, rows * per_row, _aligned_8bit(cols, row[:n_values])])
        built = _build(groups, kept, reusable, PER_PROGRAM, size=-2)
        return [(pdt, *tables) for (_, pdt), tables in built.items()], built

    return _cached("8-bit", codes[0][0], signature, build)


def _lr_args_8bit(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float, bool]:
    """The learning rate at the reference's precision: a tensor's own value (float64 in the
    kernel), or the Python float itself (a float64 argument; a CPU tensor's value exactly)."""
    value = _host_lr(lr, device)
    if value is None:
        dtype = lr.dtype if lr.dtype in (torch.float32, torch.float64) else torch.float32
        return lr.to(device=device, dtype=dtype), 0.0, True
    return None, value, False


def adamw8bit(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              exp_avg_scales: list[Tensor], exp_avg_sq_scales: list[Tensor], state_steps: list[Tensor], *,
              lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, correct_bias: bool,
              maximize: bool, rounding_seeds: Sequence[int] | None = None, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    """One fused AdamW step on 8-bit states (the signature of adamw8bit's backends): contiguous
    tensors; codes uint8 shaped like the parameter, float32 scales (rows, ceil(cols / 256))."""
    plan = _plan_8bit(params, grads, [exp_avgs, exp_avg_sqs], [exp_avg_scales, exp_avg_sq_scales], state_steps)
    for pdt, idx, table, blocks, n_programs in plan.launches:
        device = params[idx[0]].device
        if not n_programs:
            continue
        with on(device):
            lr_t, lr_value, lr_tensor = _lr_args_8bit(lr, device)
            scale, inf = _amp_args(grad_scale, found_inf, device)
            seeds, rounds = _seeds(rounding_seeds, pdt, idx, device)
            plan.captured = plan.captured or _capturing(device)
            _adamw8bit_kernel[(n_programs,)](
                table, blocks, lr_t, lr_value, float(weight_decay), scale, inf, _log_betas(beta1, beta2, device),
                seeds, f32(beta2), f32(1 - beta1), f32(1 - beta2), f32(eps),
                P=TL[pdt], QBLOCK=_8bit.BLOCK, PER_PROGRAM=PER_PROGRAM, LR_TENSOR=lr_tensor,
                SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None, CORRECT_BIAS=correct_bias,
                MAXIMIZE=maximize, ROUND=rounds,
                num_warps=NUM_WARPS_8BIT, enable_fp_fusion=False,  # only the reference's fused multiply-adds
            )


def lion8bit(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_scales: list[Tensor], *,
             lr: float | Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
             rounding_seeds: Sequence[int] | None = None, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> None:
    """One fused Lion step on an 8-bit momentum (the signature of lion8bit's backends)."""
    plan = _plan_8bit(params, grads, [exp_avgs], [exp_avg_scales], None)
    for pdt, idx, table, blocks, n_programs in plan.launches:
        device = params[idx[0]].device
        if not n_programs:
            continue
        with on(device):
            lr_t, lr_value, lr_tensor = _lr_args_8bit(lr, device)
            scale, inf = _amp_args(grad_scale, found_inf, device)
            seeds, rounds = _seeds(rounding_seeds, pdt, idx, device)
            plan.captured = plan.captured or _capturing(device)
            _lion8bit_kernel[(n_programs,)](
                table, blocks, lr_t, lr_value, float(weight_decay), scale, inf, seeds,
                f32(1 - beta1), f32(1 - beta2),
                P=TL[pdt], QBLOCK=_8bit.BLOCK, PER_PROGRAM=PER_PROGRAM, LR_TENSOR=lr_tensor,
                SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None, MAXIMIZE=maximize,
                ROUND=rounds,
                num_warps=NUM_WARPS_8BIT, enable_fp_fusion=False,  # only the reference's fused multiply-adds
            )
