"""SparseAdamW's GPU kernel (Triton): one launch per tensor over the rows its gradient touched.

Imported on first use by optimizer/sparse_adamw.py (``import optimizer`` needs only torch).
A program takes ``ROWS`` touched rows and walks them ``COLS`` elements at a time (``ROWS *
COLS = 2048``: a 1024-wide embedding row is half a program, a 1-D parameter's 2048 elements
one program). It reads each row's decay log once, pays the decay the row owes (Note [lazy
decay] in sparse_adamw.py: ``exp(L_before - l[i]) * (1 - lr wd)`` in float64, rounded once to
float32), applies AdamW's update to every element of the row, and writes the row's log
last: rows are distinct (repeated ones were summed first), so no two programs touch one row.

The math is the reference's (``_single_tensor_sparse_adamw``) operation for operation, in
float32, each correctly rounded and fused exactly where torch's CPU kernels fuse (``lerp``
and ``addcmul``: one multiply-add each; compiled with ``enable_fp_fusion=False`` so that
there are no others), with the scalars rounded to float32 as torch rounds them: Note
[8-bit kernels] in _fused_triton.py, whose helpers it uses. Tested against the reference
at every step through Triton's interpreter on CPU tensors (tests/test_sparse_adamw.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._fused_triton import TL, f32, lerp_fma, on, store
from .adamw import bias_corrections

__all__ = ["BLOCK", "SUPPORTED", "sparse_adamw"]

BLOCK = 2048  # elements a program holds at a time: ROWS x COLS
NUM_WARPS = 4
# (parameter dtype, state dtype) pairs the kernel takes: SparseAdamW keeps float32 state for
# fp32/bf16/fp16 parameters; float64 parameters take the reference
SUPPORTED = {(p, torch.float32) for p in TL}


@triton.jit
def _sparse_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, rows_ptr, logs_ptr, n_rows, row_len,
                         log_before: tl.float64, log_after: tl.float64, decay_now: tl.float64,
                         neg_step_size, bc2_sqrt, w1, beta2, w2, eps,
                         P: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, MAXIMIZE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # slots in the gradient's rows
    live = r < n_rows
    row = tl.load(rows_ptr + r, mask=live, other=0)                # the rows of the parameter
    before = tl.zeros((ROWS,), tl.float64) + log_before            # (float64 in the interpreter too)
    owed = tl.exp(before - tl.load(logs_ptr + row, mask=live, other=0.0)) * decay_now
    decay = owed.to(tl.float32)[:, None]                           # prod (1 - lr_s wd) since paid
    p_start = row[:, None] * row_len
    g_start = r[:, None] * row_len
    for start in range(0, row_len, COLS):
        cols = start + tl.arange(0, COLS)[None, :]
        mask = live[:, None] & (cols < row_len)
        offs = p_start + cols
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_start + cols, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if MAXIMIZE:
            g = -g

        p = p * decay                                             # theta <- theta * owed
        m = lerp_fma(m, g, w1)                                   # m_t = b1 m + (1 - b1) g
        v = tl.fma(w2 * g, g, v * beta2)                          # v_t = b2 v + (1 - b2) g^2 (addcmul)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps          # sqrt(v_t / (1 - b2^t)) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)               # theta -= lr / (1 - b1^t) m_t / denom

        store(p_ptr, offs, mask, p, P)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    tl.store(logs_ptr + row, tl.zeros((ROWS,), tl.float64) + log_after, mask=live)  # l[i] = L_t


def launch_shape(row_len: int) -> tuple[int, int]:
    """(ROWS, COLS) of a program for rows of ``row_len`` elements: whole rows up to BLOCK wide."""
    cols = min(triton.next_power_of_2(max(row_len, 1)), BLOCK)
    return BLOCK // cols, cols


def sparse_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 state_steps: list[Tensor], decay_logs: list[Tensor], row_decay_logs: list[Tensor], *,
                 lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, correct_bias: bool,
                 maximize: bool) -> None:
    """One step over the touched rows (the signature of sparse_adamw's backends): gradients with
    distinct rows; contiguous parameters, moments (float32) and row logs (the dispatcher sends no others)."""
    lr = float(lr)
    decay = 1 - lr * weight_decay
    log_step = math.log1p(-lr * weight_decay)
    steps = bias_corrections(lr, beta1, beta2, state_steps, correct_bias)
    for i, (p, grad, m, v, decay_log, logs) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, decay_logs,
                                                              row_decay_logs)):
        rows, values = grad._indices()[0], grad._values().contiguous()
        n = rows.numel()
        if n == 0:
            continue
        row_len = p.numel() // p.shape[0]
        per, cols = launch_shape(row_len)
        before = float(decay_log)
        neg_step_size, bc2_sqrt = steps[i]
        with on(p.device):
            _sparse_adamw_kernel[(triton.cdiv(n, per),)](
                p, values, m, v, rows, logs, n, row_len, before, before + log_step, decay,
                f32(neg_step_size), f32(bc2_sqrt), f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(eps),
                P=TL[p.dtype], ROWS=per, COLS=cols, MAXIMIZE=maximize,
                num_warps=NUM_WARPS, enable_fp_fusion=False,  # only the reference's fused multiply-adds
            )
