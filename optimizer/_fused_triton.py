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
  cost the same one launch.
* The tables depend only on those addresses and sizes. They are built on the
  host, copied with a non-blocking copy from pinned memory (no host sync), and
  kept in a small cache keyed by the addresses, sizes, dtypes and layouts (read
  with C-level maps: about 0.3 us per tensor): in a training loop the caching
  allocator hands the gradients the same memory each step, so after the first
  step nothing is rebuilt or copied; and a step captured in a CUDA graph
  replays the same tables.
* The learning rate may be a tensor on the device and AdamW's step counts live
  on the device (``state["step"]``), so bias corrections are computed in the
  kernel: nothing in ``step()`` reads a value back to the host.
* ``torch.amp.GradScaler``: with ``grad_scale`` the kernel divides the gradient
  by it; with ``found_inf`` (a device flag) every block returns before writing
  anything, and the step counters are put back: the step is skipped with
  nothing changed, without a sync.
* Math in float32 whatever the storage (fp32, bf16 or fp16 parameters; fp32 or
  bf16 states), rounded once into each stored value, to nearest even.
* No autotuning: a block is 2048 elements (x 4 warps: 16 per thread, four
  16-byte loads per fp32 stream), so nothing ever runs twice on the same data.

The element-wise math is the same as the references' (docstrings of AdamW and
Lion) and is tested against them at every step, in CI through Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors) and on a GPU for real.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
from typing import Any
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tensors import local

__all__ = ["BLOCK", "SUPPORTED", "adamw", "lion"]

BLOCK = 2048
NUM_WARPS = 4
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# (parameter dtype, state dtype) pairs the kernels take (Note [backends]); the rest go the foreach way
SUPPORTED = {(p, s) for p in _TL for s in (torch.float32, torch.bfloat16)}


@triton.jit
def _store(ptr, offs, mask, x, DTYPE: tl.constexpr):
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
def _address(entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor address stored at ``entry`` of the table, as a pointer to DTYPE. ALIGNED: the
    host checked it is a multiple of 16 bytes, so loads and stores can be 16-byte vectors."""
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
                    weight_decay, beta2, w1, w2, eps,
                    P: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The AdamW update of one block (mask None: a whole block, vector loads)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    if SCALED:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g

    p = p * (1 - lr * weight_decay)                           # theta (1 - lr wd)
    m = _lerp(m, g, w1)                                       # m_t = b1 m + (1 - b1) g
    v = v * beta2 + w2 * g * g                                # v_t = b2 v + (1 - b2) g^2
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps          # sqrt(v_hat) + eps
    p = p + tl.div_rn((-lr / bc1) * m, denom)                 # theta - lr m_hat / denom

    _store(p_ptr, offs, mask, p, P)
    _store(m_ptr, offs, mask, m, S)
    _store(v_ptr, offs, mask, v, S)


@triton.jit
def _adamw_kernel(table, blocks, lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, log_betas,
                  weight_decay, beta2, w1, w2, eps,
                  P: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, LR_TENSOR: tl.constexpr,
                  SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, CORRECT_BIAS: tl.constexpr,
                  MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    block = tl.program_id(0)
    t = tl.load(blocks + 2 * block)
    start = tl.multiple_of(tl.load(blocks + 2 * block + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    row = table + 6 * t                   # p, g, m, v, step, numel
    p_ptr = _address(row, P, ALIGNED)
    g_ptr = _address(row + 1, P, ALIGNED)
    m_ptr = _address(row + 2, S, ALIGNED)
    v_ptr = _address(row + 3, S, ALIGNED)
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))  # already counted
    numel = tl.load(row + 5)
    lr = tl.load(lr_ptr).to(tl.float32) if LR_TENSOR else lr_value
    if CORRECT_BIAS:  # in float64: 1 - b2^t in float32 would lose the digits that matter
        t = step.to(tl.float64)
        bc1 = (1.0 - tl.exp(t * tl.load(log_betas))).to(tl.float32)                   # 1 - b1^t
        bc2_sqrt = tl.sqrt_rn((1.0 - tl.exp(t * tl.load(log_betas + 1))).to(tl.float32))  # sqrt(1 - b2^t)
    else:
        bc1 = 1.0
        bc2_sqrt = 1.0
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be vectors
        _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, lr, bc1, bc2_sqrt, grad_scale_ptr,
                        weight_decay, beta2, w1, w2, eps, P, S, SCALED, MAXIMIZE)
    else:                       # the tensor's last, partial block
        _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, lr, bc1, bc2_sqrt, grad_scale_ptr,
                        weight_decay, beta2, w1, w2, eps, P, S, SCALED, MAXIMIZE)


@triton.jit
def _lion_elements(p_ptr, g_ptr, m_ptr, offs, mask, lr, grad_scale_ptr, weight_decay, w1, w2,
                   P: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The Lion update of one block (mask None: a whole block, vector loads)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    if SCALED:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g

    c = _lerp(m, g, w1)                                       # c = b1 m + (1 - b1) g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch.sign: 0 at 0 and at nan
    p = p * (1 - lr * weight_decay) - lr * sign               # theta (1 - lr wd) - lr sign(c)
    m = _lerp(m, g, w2)                                       # m_t = b2 m + (1 - b2) g

    _store(p_ptr, offs, mask, p, P)
    _store(m_ptr, offs, mask, m, S)


@triton.jit
def _lion_kernel(table, blocks, lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, weight_decay, w1, w2,
                 P: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, LR_TENSOR: tl.constexpr,
                 SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    if SKIPPABLE:
        if tl.load(found_inf_ptr) != 0:  # GradScaler found inf/nan: change nothing
            return
    block = tl.program_id(0)
    t = tl.load(blocks + 2 * block)
    start = tl.multiple_of(tl.load(blocks + 2 * block + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    row = table + 4 * t                   # p, g, m, numel
    p_ptr = _address(row, P, ALIGNED)
    g_ptr = _address(row + 1, P, ALIGNED)
    m_ptr = _address(row + 2, S, ALIGNED)
    numel = tl.load(row + 3)
    lr = tl.load(lr_ptr).to(tl.float32) if LR_TENSOR else lr_value
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be vectors
        _lion_elements(p_ptr, g_ptr, m_ptr, offs, None, lr, grad_scale_ptr, weight_decay, w1, w2,
                       P, S, SCALED, MAXIMIZE)
    else:                       # the tensor's last, partial block
        _lion_elements(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, grad_scale_ptr, weight_decay, w1, w2,
                       P, S, SCALED, MAXIMIZE)


# ----- the launch plan: which tensors, in which tables -----------------------------------

Launch = tuple[torch.dtype, torch.dtype, bool, list[int], Tensor, Tensor, int]  # dtypes, aligned, indices, tables
_PLANS: OrderedDict[tuple, list[Launch]] = OrderedDict()
_PLANS_KEPT = 32
_DTYPE = operator.attrgetter("dtype")


def _tables(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(the tensor table, the block table, the number of blocks) for these rows of addresses
    and sizes (size last), copied to ``device`` without a host sync."""
    table = torch.tensor(rows, dtype=torch.int64)
    counts = torch.tensor([-(-row[-1] // BLOCK) for row in rows], dtype=torch.int64)
    n_blocks = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(n_blocks) - first[owner]) * BLOCK
    blocks = torch.stack([owner, start], 1).contiguous()
    if device.type != "cpu":  # pinned, so that the copy is asynchronous
        table = table.pin_memory().to(device, non_blocking=True)
        blocks = blocks.pin_memory().to(device, non_blocking=True)
    return table, blocks, n_blocks


def _plan(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], counters: list[Tensor] | None
          ) -> list[Launch]:
    """The launches of a step: one per device, parameter dtype, state dtype and alignment, with
    its tables. The dispatcher (``_dispatch.route``) sends only tensors the kernels take.

    This runs every step, so it is cached under a signature that is cheap to compute (C-level
    maps over the lists): every address, size and the dtypes. In a training loop the signature
    repeats from the second step on and nothing is rebuilt or copied."""
    lists = [params, grads, *states, *([counters] if counters is not None else [])]
    if params and type(params[0]).__name__ == "DTensor":  # FSDP2: the local shards
        lists = [list(map(local, lst)) for lst in lists]
    signature = tuple(itertools.chain(  # states and counters are ours: new ones have new addresses
        *[map(Tensor.data_ptr, lst) for lst in lists],
        map(Tensor.numel, lists[0]),
        map(_DTYPE, lists[0]), map(_DTYPE, lists[2]), map(operator.attrgetter("device"), lists[0]),
    ))
    plan = _PLANS.get(signature)
    if plan is not None:
        _PLANS.move_to_end(signature)
        return plan
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype, bool], tuple[list[int], list[list[int]]]] = {}
    n_ts = 2 + len(states)  # parameter, gradient, states; then the step counter, if any
    for i, ts in enumerate(zip(*lists)):
        row = [t.data_ptr() for t in ts]
        aligned = all(a % 16 == 0 for a in row[:n_ts])  # views at odd offsets: scalar loads
        idx, rows = groups.setdefault((ts[0].device, ts[0].dtype, ts[2].dtype, aligned), ([], []))
        idx.append(i)
        rows.append(row + [ts[0].numel()])
    launches = [(pdt, sdt, aligned, idx, *_tables(rows, device))
                for (device, pdt, sdt, aligned), (idx, rows) in groups.items()]
    _PLANS[signature] = launches
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return launches


def _lr_args(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float, bool]:
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float32), 0.0, True
    return None, float(lr), False


def _amp_args(grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device
              ) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's scale and flag where the launch reads them (no copy where they already are)."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in (grad_scale, found_inf))


def _on(device: torch.device) -> Any:
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


# ----- the backends (the signatures of adamw's and lion's backends, Note [backends]) --------

def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
          weight_decay: float, correct_bias: bool, maximize: bool, grad_scale: Tensor | None = None,
          found_inf: Tensor | None = None) -> None:
    """One fused AdamW step (the signature of adamw's backends)."""
    launches = _plan(params, grads, [exp_avgs, exp_avg_sqs], state_steps)
    for pdt, sdt, aligned, idx, table, blocks, n_blocks in launches:
        device = params[idx[0]].device
        lr_t, lr_value, lr_tensor = _lr_args(lr, device)
        scale, inf = _amp_args(grad_scale, found_inf, device)
        if n_blocks:
            with _on(device):
                _adamw_kernel[(n_blocks,)](
                    table, blocks, lr_t, lr_value, scale, inf, _log_betas(beta1, beta2, device),
                    weight_decay, beta2, 1 - beta1, 1 - beta2, eps,
                    P=_TL[pdt], S=_TL[sdt], BLOCK=BLOCK, LR_TENSOR=lr_tensor, SCALED=grad_scale is not None,
                    SKIPPABLE=found_inf is not None, CORRECT_BIAS=correct_bias, MAXIMIZE=maximize, ALIGNED=aligned,
                    num_warps=NUM_WARPS, enable_fp_fusion=True,  # fused multiply-adds, as nvcc compiles torch's
                )


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
         beta1: float, beta2: float, weight_decay: float, maximize: bool, grad_scale: Tensor | None = None,
         found_inf: Tensor | None = None) -> None:
    """One fused Lion step (the signature of lion's backends)."""
    launches = _plan(params, grads, [exp_avgs], None)
    for pdt, sdt, aligned, idx, table, blocks, n_blocks in launches:
        device = params[idx[0]].device
        lr_t, lr_value, lr_tensor = _lr_args(lr, device)
        scale, inf = _amp_args(grad_scale, found_inf, device)
        if n_blocks:
            with _on(device):
                _lion_kernel[(n_blocks,)](
                    table, blocks, lr_t, lr_value, scale, inf, weight_decay, 1 - beta1, 1 - beta2,
                    P=_TL[pdt], S=_TL[sdt], BLOCK=BLOCK, LR_TENSOR=lr_tensor, SCALED=grad_scale is not None,
                    SKIPPABLE=found_inf is not None, MAXIMIZE=maximize, ALIGNED=aligned,
                    num_warps=NUM_WARPS, enable_fp_fusion=True,  # fused multiply-adds, as nvcc compiles torch's
                )
