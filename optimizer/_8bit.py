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
* First moment (signed, ``exp_avg``): ``scale`` = the block's largest ``|m|``; the code is
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
  again, in one pass (the kernels keep a block in registers / cache). A NaN or infinity in
  a block makes its scale NaN and the whole block decodes to NaN (as one NaN gradient
  poisons a float32 state); a block of zeros has scale 0 and codes 0.
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
    """Largest of each block of ``a`` (>= 0 or NaN), NaN if the block holds a NaN."""
    return _blocks(a).amax(dim=2)


def _units(a: Tensor, scale: Tensor, levels: int) -> Tensor:
    """``levels^2 a / scale`` for a = |x| or r in [0, scale]: the square of the unrounded code.
    Evaluated as ``a k`` with ``k = levels^2 / scale`` rounded once per block (a product per value,
    no division), or as ``(a / scale) levels^2`` where k overflows (scales below levels^2 / 3.4e38);
    0 where the scale is 0 or NaN (a NaN block's codes are 0: its scale carries the NaN). The
    per-block quotients divide two tensors: torch's CUDA division *by a Python number* is a
    multiplication by its reciprocal, which does not round as the division does."""
    k = torch.full_like(scale, levels * levels) / scale
    s, kv = _per_value(scale, a.shape[1]), _per_value(k, a.shape[1])
    u = torch.where(kv.isfinite(), a * kv, a / s * (levels * levels))
    return torch.where(s > 0, u, torch.zeros_like(u))


def _nearest_code(u: Tensor) -> Tensor:
    """floor(sqrt(u) + 0.5): the code nearest to sqrt(u); 0 where u is NaN (an infinite value)."""
    return torch.nan_to_num(torch.floor(torch.sqrt(u) + 0.5), nan=0.0)


def _unit(scale: Tensor, levels: int) -> Tensor:
    """The value of one squared code step of each block, ``scale / levels^2``, rounded once."""
    return scale / torch.full_like(scale, levels * levels)  # (two tensors: see _units)


def encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (rows, cols) -> int8 codes (rows, cols), float32 scales (rows, blocks)."""
    a = x.abs()
    scale = _block_max(a)
    c = _nearest_code(_units(a, scale, 127))
    return (torch.sign(x) * c).to(torch.int8), scale


def decode_signed(codes: Tensor, scale: Tensor) -> Tensor:
    """int8 codes (rows, cols), scales (rows, blocks) -> float32 values: c |c| (scale / 127^2)."""
    c = codes.to(torch.float32)
    return (c * c.abs()) * _per_value(_unit(scale, 127), codes.shape[1])  # c |c| is exact


def root_seed(step: int | float) -> int:
    """The 32-bit seed of the second moment's stochastic codes at step ``t`` (already counted)."""
    return mix32(int(step) & M32)


def encode_root(r: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """float32 r >= 0 (rows, cols) -> uint8 codes, float32 scales; a positive r gets code >= 1.
    With ``seed`` (:func:`root_seed`) the codes round stochastically, unbiased for v = r^2;
    without, to nearest (checkpoint conversions)."""
    scale = _block_max(r)
    u = _units(r, scale, 255)                    # x^2, x = 255 sqrt(r / scale) the unrounded code
    if seed is None:
        c = _nearest_code(u)
    else:
        lo = torch.floor(torch.sqrt(u))
        hi = lo + 1
        lo2, hi2 = lo * lo, hi * hi
        bits = mix32(((r.view(torch.int32).to(torch.int64) & M32) >> 8) ^ seed) >> 16
        up = bits.to(torch.float32) * (hi2 * hi2 - lo2 * lo2) < (u * u - lo2 * lo2) * 65536
        c = torch.nan_to_num(lo + up, nan=0.0).clamp(max=255)  # (u may pass 255^2 by an ulp)
    c = torch.where(r > 0, c.clamp(min=1), c)
    return c.to(torch.uint8), scale


def decode_root(codes: Tensor, scale: Tensor) -> Tensor:
    """uint8 codes (rows, cols), scales (rows, blocks) -> float32 r: c^2 (scale / 255^2)."""
    c = codes.to(torch.float32)
    return (c * c) * _per_value(_unit(scale, 255), codes.shape[1])  # c^2 is exact


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
