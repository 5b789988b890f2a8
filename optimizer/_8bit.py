"""8-bit optimizer states, written as plain torch: the spec that the C loop and the Triton
kernels follow bit for bit (tests/test_8bit.py ties them).

Note [8-bit states]
~~~~~~~~~~~~~~~~~~~
``state_dtype=torch.uint8`` (and ``AdamW8bit``, ``Lion8bit``) stores each state value of
a large tensor in one byte, with one float32 scale per block of values (Dettmers et al.,
2022, "8-bit Optimizers via Block-wise Quantization"; our code map is our own, below).

* Blocks: the parameter is seen as ``rows x cols`` (rows = its first dimension) and each
  row is cut into blocks of ``BLOCK`` = 256 values (the last block of a row may be shorter).
  A block never straddles two rows, so it never straddles two shards of FSDP2, which
  shards the first dimension: codes and scales of a shard are a shard of codes and scales.
  Scales are float32 of shape ``(rows, ceil(cols / 256))``: 4/256 = 0.016 bytes per value.
* Which tensors: real floating tensors of at least 2 dimensions and ``min_8bit_size``
  (4096) values. Others (biases, norms, small tensors) keep float32 states: they are
  few bytes and the most sensitive ones.
* First moment (signed, ``exp_avg``): ``scale`` = the block's largest ``|m|`` (its largest
  finite one, at most ``MAX_SCALE``: below); the code is
  ``c = floor(127 sqrt(|m| / scale) + 0.5)`` with m's sign, stored as int8 (viewed as the
  uint8 tensor ``exp_avg``); decoded as ``sign(c) (|c| / 127)^2 scale``. Companding by the
  square root keeps small values' relative precision: 1/127^2 of the block's largest value
  is still one code (linear codes would lose everything below 1/254 of it). In float32
  both are written with one quotient per block, not per value: the code as
  ``floor(sqrt(|m| k) + 0.5)`` with ``k = 127^2 / scale``, the value as ``c |c| unit``
  with ``unit = scale / 127^2`` (``c |c|`` is an exact integer); the same for the second
  moment's 255 levels. On a CPU with few cores the 8-bit loop is bound by its arithmetic
  (docs/benchmarks.md), where a correctly rounded quotient per value costs a visible share.
  So the top code decodes to ``127^2 RN(scale / 127^2)``, within an ulp of the scale: a
  state converted to float32 and back keeps its codes, and about 1 % of its scales move by
  an ulp (a second conversion changes nothing).
* Second moment (AdamW's ``exp_avg_sq``): what the update uses is ``r = sqrt(v)``, so ``r``
  is stored: ``scale`` = the block's largest r, decoded as ``(c / 255)^2 scale``, the code
  ``c`` at least 1 where r > 0 (a positive r never decodes to 0, so ``m / (r + eps)`` cannot
  explode where v was small but not zero). The code is rounded *stochastically*, unbiased
  for v: with ``x = 255 sqrt(r / scale)`` and ``lo = floor(x)``, ``c = lo + 1`` with
  probability ``(x^4 - lo^4) / ((lo + 1)^4 - lo^4)``, else ``lo`` (v decodes to
  ``(c / 255)^4 scale^2``, so E[decoded v] = v). Round to nearest cannot follow v's decay:
  with beta2 = 0.999 v shrinks 0.1% a step, less than half a code (a code is 0.8% of r, 1.6%
  of v, near the top of a block), so every decrease is rounded away while a large gradient's
  increase is kept: v ratchets up (against float32 states fed the same gradients, the mean
  relative error grows without bound: +7% after 1000 steps, +30% after 3000). Stochastic
  codes turn that bias into noise that does not grow: a median error of 6% per value once v
  has settled, a mean within 0.13% of zero (tests/test_8bit.py; docs/algorithms.md).
  The 16 random bits of a value are a hash of its r (its float32 bits but the last 8) and
  of the step, ``mix32((bits(r) >> 8) ^ root_seed(t)) >> 16``, rounding up iff
  ``bits (hi^4 - lo^4) < (x^4 - lo^4) 65536``. They depend on nothing but the value and the
  step, so a shard (FSDP2, ZeRO) rounds as the whole tensor does and a resumed run is
  bit-identical; without r's last bits, an r one rounding away (a sqrt that is not
  correctly rounded, as torch's CPU one) nearly always draws the same bits. The first
  moments (AdamW's and Lion's) decay by 10% (1%) a step, far more than a code: they round
  to nearest.
* Each step decodes, updates in float32 exactly as the float32 optimizer does, and encodes
  again, in one pass (the kernels keep a block in registers / cache). A block of zeros has
  scale 0 and codes 0.
* Infinities and NaNs stay in their value, as in float32 states. One overflowing ``g^2``
  makes that value's ``v`` infinite and its update 0 from then on (``m / inf``), while
  float32 AdamW keeps every other value finite; Lion's momentum can overflow the same way
  (``g - m``). Were the infinity its block's scale, every code of the block would decode to
  ``0 inf`` = NaN or to inf. So a block that holds an infinity or a NaN ("special") has as
  its scale its largest *finite* magnitude, stored negated (the sign bit marks the block;
  -0 where nothing in it is finite and non-zero), codes its finite values on fewer levels,
  126 signed and 253 root, and gives the top codes to the others: signed ``127`` = +inf,
  ``-127`` = -inf, ``-128`` = NaN; root ``255`` = inf, ``254`` = NaN. Its other values keep
  their 8-bit accuracy (against its largest finite value), and the special value goes on
  exactly as in float32. Ordinary blocks are coded as before, so checkpoints written before
  keep their meaning: no scale was negative (one of NaN or inf still decodes its block to
  NaN, as it did), and the signed code -128 was never written. The C loop tests for a
  special block once per block: ordinary blocks run the loops they ran before.
* A scale is at most ``MAX_SCALE``, the float32 below the largest: with the largest as its
  scale, a block's top code would decode to ``127^2 RN(scale / 127^2)``, which rounds up to
  inf. The largest value itself still gets the top code, and decodes within an ulp of it.
* Everything is a function of the values and the step: a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._rounding import M32, mix32
from ._tensors import is_dtensor

__all__ = ["BLOCK", "MIN_8BIT_SIZE", "convert_states", "decode_root", "decode_signed", "encode_root",
           "encode_signed", "new_scales", "quantized", "root_seed", "rows_cols", "scale_shape"]

BLOCK = 256          # values per scale (Note [8-bit states])
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 states


def quantized(param: Tensor, min_8bit_size: int = MIN_8BIT_SIZE) -> bool:
    """Whether ``state_dtype=torch.uint8`` stores this parameter's states in 8 bits."""
    return (param.dim() >= 2 and param.numel() >= min_8bit_size
            and param.dtype in (torch.float32, torch.bfloat16, torch.float16))


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), math.prod(shape[1:])  # (an FSDP2 shard may have no rows)


def scale_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Shape of the float32 scales of a state of this shape: one per row and block of 256."""
    rows, cols = rows_cols(shape)
    return rows, -(-cols // BLOCK)


def _blocks(x: Tensor) -> Tensor:
    """(rows, cols) -> (rows, blocks, BLOCK), padded with zeros."""
    rows, cols = x.shape
    pad = -cols % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, (cols + pad) // BLOCK, BLOCK)


def _per_value(scale: Tensor, cols: int) -> Tensor:
    """(rows, blocks) scales -> (rows, cols): each value's block scale."""
    return scale.repeat_interleave(BLOCK, dim=1)[:, :cols]


def _block_max(a: Tensor) -> Tensor:
    """Largest of each block of ``a`` (>= 0)."""
    return _blocks(a).amax(dim=2)


# Levels of the codes: (ordinary block, special block); the top codes of a special block are its
# infinities and NaNs (Note [8-bit states])
SIGNED_LEVELS = (127, 126)
ROOT_LEVELS = (255, 253)
SIGNED_INF, SIGNED_NAN = 127, -128  # (-127: -inf)
ROOT_NAN, ROOT_INF = 254, 255
# The largest scale, the float32 below the largest: at the largest, the top code would decode to
# 127^2 RN(scale / 127^2), which rounds up to inf (Note [8-bit states])
MAX_SCALE = 3.4028232635611926e38  # bits 0x7f7ffffe


def _finite_blocks(a: Tensor, levels: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For ``a`` = |x| or r (rows, cols): ``a`` with its infinities and NaNs zeroed, the largest
    finite value of each block (at most MAX_SCALE: its scale), which blocks hold an infinity or a
    NaN, and their levels."""
    finite = a.isfinite()
    finite_a = torch.where(finite, a, torch.zeros_like(a))
    top = _block_max(finite_a).clamp(max=MAX_SCALE)
    special = _block_max((~finite).to(a.dtype)) > 0
    return finite_a, top, special, torch.full_like(top, levels[0]).masked_fill_(special, levels[1])


def _units(a: Tensor, top: Tensor, block_levels: Tensor) -> Tensor:
    """``levels^2 a / top`` for finite a in [0, top]: the square of the unrounded code.
    Evaluated as ``a k`` with ``k = levels^2 / top`` rounded once per block (a product per value,
    no division), or as ``(a / top) levels^2`` where k overflows (tops below levels^2 / 3.4e38);
    0 where top is 0. The per-block quotients divide two tensors: torch's CUDA division *by a
    Python number* is a multiplication by its reciprocal, which does not round as the division
    does."""
    levels2 = block_levels * block_levels
    k = levels2 / top
    s, kv, l2 = (_per_value(b, a.shape[1]) for b in (top, k, levels2))
    u = torch.where(kv.isfinite(), a * kv, a / s * l2)
    return torch.where(s > 0, u, torch.zeros_like(u))


def _nearest_code(u: Tensor) -> Tensor:
    """floor(sqrt(u) + 0.5): the code nearest to sqrt(u)."""
    return torch.floor(torch.sqrt(u) + 0.5)


def _unit(scale: Tensor, levels: tuple[int, int]) -> Tensor:
    """The value of one squared code step of each block, ``|scale| / levels^2`` (levels of a
    special block where the scale is negative), rounded once."""
    levels2 = torch.full_like(scale, levels[0] ** 2).masked_fill_(torch.signbit(scale), levels[1] ** 2)
    return scale.abs() / levels2  # (two tensors: see _units)


def encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (rows, cols) -> int8 codes (rows, cols), float32 scales (rows, blocks)."""
    a = x.abs()
    finite_a, top, special, block_levels = _finite_blocks(a, SIGNED_LEVELS)
    c = _nearest_code(_units(finite_a, top, block_levels))
    c = torch.where(a == math.inf, float(SIGNED_INF), c)      # +-inf: the top code, with the sign
    c = torch.where(x.isnan(), float(SIGNED_NAN), torch.sign(x) * c)
    return c.to(torch.int8), torch.where(special, -top, top)   # a special block's scale negated


def decode_signed(codes: Tensor, scale: Tensor) -> Tensor:
    """int8 codes (rows, cols), scales (rows, blocks) -> float32 values: c |c| (|scale| / 127^2),
    or 126^2 and the infinities and NaNs in a special block (a negative scale)."""
    c = codes.to(torch.float32)
    x = (c * c.abs()) * _per_value(_unit(scale, SIGNED_LEVELS), codes.shape[1])  # c |c| is exact
    specials = torch.where(c == SIGNED_NAN, math.nan, torch.sign(c) * math.inf)
    return torch.where(_per_value(torch.signbit(scale), codes.shape[1]) & (c.abs() >= SIGNED_INF), specials, x)


def root_seed(step: int | float) -> int:
    """The 32-bit seed of the second moment's stochastic codes at step ``t`` (already counted)."""
    return mix32(int(step) & M32)


def encode_root(r: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """float32 r >= 0 (rows, cols) -> uint8 codes, float32 scales; a positive r gets code >= 1.
    With ``seed`` (:func:`root_seed`) the codes round stochastically, unbiased for v = r^2;
    without, to nearest (checkpoint conversions)."""
    finite_r, top, special, block_levels = _finite_blocks(r, ROOT_LEVELS)
    u = _units(finite_r, top, block_levels)      # x^2, x = levels sqrt(r / top) the unrounded code
    if seed is None:
        c = _nearest_code(u)
    else:
        lo = torch.floor(torch.sqrt(u))
        hi = lo + 1
        lo2, hi2 = lo * lo, hi * hi
        bits = mix32(((r.view(torch.int32).to(torch.int64) & M32) >> 8) ^ seed) >> 16
        up = bits.to(torch.float32) * (hi2 * hi2 - lo2 * lo2) < (u * u - lo2 * lo2) * 65536
        c = torch.minimum(lo + up, _per_value(block_levels, r.shape[1]))  # (u may pass levels^2 by an ulp)
    c = torch.where(r > 0, c.clamp(min=1), c)
    c = torch.where(r == math.inf, float(ROOT_INF), torch.where(r.isnan(), float(ROOT_NAN), c))
    return c.to(torch.uint8), torch.where(special, -top, top)   # a special block's scale negated


def decode_root(codes: Tensor, scale: Tensor) -> Tensor:
    """uint8 codes (rows, cols), scales (rows, blocks) -> float32 r: c^2 (|scale| / 255^2), or
    253^2 and the infinities and NaNs in a special block (a negative scale)."""
    c = codes.to(torch.float32)
    r = (c * c) * _per_value(_unit(scale, ROOT_LEVELS), codes.shape[1])  # c^2 is exact
    specials = torch.where(c == ROOT_INF, math.inf, math.nan)
    return torch.where(_per_value(torch.signbit(scale), codes.shape[1]) & (c >= ROOT_NAN), specials, r)


# ----- checkpoints -------------------------------------------------------------------

_ROOT_KEYS = ("exp_avg_sq",)  # second moments, stored as their square root


def new_scales(param: Tensor) -> Tensor:
    """Zero scales for ``param``'s 8-bit states; for an FSDP2 parameter (a DTensor sharded on
    its first dimension) a DTensor sharded the same way: a shard's scales are its rows'."""
    if not is_dtensor(param):
        return torch.zeros(scale_shape(param.shape), dtype=torch.float32, device=param.device)
    from torch.distributed.tensor import DTensor

    local = param.to_local()
    shape = scale_shape(param.shape)
    return DTensor.from_local(torch.zeros((local.shape[0], shape[1]), dtype=torch.float32, device=local.device),
                              param.device_mesh, param.placements, run_check=False, shape=shape,
                              stride=(shape[1], 1))


def convert_states(param: Tensor, saved: dict[str, object], keys: Sequence[str], to_8bit: bool) -> dict[str, object]:
    """A saved state converted to the precision this optimizer keeps for ``param``: 8-bit codes
    and scales decoded to float32, float states encoded, 8-bit ones copied. Counters pass."""
    out = {k: v for k, v in saved.items() if k not in keys and not any(k == f"{s}_scale" for s in keys)}
    scales = {}  # after the codes, in the order the optimizer creates them
    is_8bit = f"{keys[0]}_scale" in saved
    rows, cols = rows_cols(param.shape)
    for key in keys:
        value = saved[key]
        if is_8bit and to_8bit:
            scale = saved[f"{key}_scale"]
            out[key] = value.detach().to(device=param.device, dtype=torch.uint8, copy=True)
            scales[f"{key}_scale"] = scale.detach().to(device=param.device, dtype=torch.float32, copy=True)
            continue
        if is_dtensor(value) or is_dtensor(param):
            raise ValueError(f"Invalid state[{key!r}]: converting sharded (DTensor) states between 8-bit and "
                             "float precision is not supported; load with the state_dtype they were saved in")
        if is_8bit:
            codes = value.to(param.device).reshape(rows, cols)
            scale = saved[f"{key}_scale"].to(device=param.device, dtype=torch.float32)
            if key in _ROOT_KEYS:
                r = decode_root(codes, scale)
                out[key] = (r * r).reshape(param.shape)
            else:
                out[key] = decode_signed(codes.view(torch.int8), scale).reshape(param.shape)
        else:
            x = value.detach().to(device=param.device, dtype=torch.float32).reshape(rows, cols)
            codes, scale = encode_root(x.sqrt()) if key in _ROOT_KEYS else encode_signed(x)
            out[key] = codes.view(torch.uint8).reshape(param.shape).clone()
            scales[f"{key}_scale"] = scale
    return {**out, **scales}
