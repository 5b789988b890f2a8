"""AdamW with 8-bit states: :class:`AdamW8bit`, and the backends that ``AdamW`` uses for
the tensors whose states ``state_dtype=torch.uint8`` quantises (Note [8-bit states] in
_8bit.py). The update is AdamW's, line for line (adamw.py); only the storage differs:
each step decodes the moments, updates in float32 and encodes them again.

Backends, one signature: ``_single_tensor_adamw8bit`` (the reference, plain torch),
``_fused_c_adamw8bit`` (the C loop, one pass per block of 256 values) and the Triton kernel
in _fused_triton.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _dispatch, _rounding
from ._tensors import host_value, local
from .adamw import AdamW, _one_minus_pow

__all__ = ["AdamW8bit"]


class AdamW8bit(AdamW):
    """:class:`AdamW` with ``state_dtype=torch.uint8`` by default: ``exp_avg`` and
    ``exp_avg_sq`` of every tensor of at least 2 dimensions and ``min_8bit_size`` values take
    one byte per value plus a float32 scale per 256 values (2.03 bytes per parameter instead
    of 8); the others keep float32 states. The name and the leading arguments are
    bitsandbytes' (``bnb.optim.AdamW8bit``); the update is exactly ours (Note [8-bit states]).
    """

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, correct_bias: bool = True, *,
                 state_dtype: torch.dtype | None = torch.uint8, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, state_dtype=state_dtype, **kwargs)


def _single_tensor_adamw8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The reference: AdamW's update between a decode and an encode of the states."""
    lr = host_value(lr)
    lists = zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps)
    for i, tensors in enumerate(lists):
        # FSDP2: each shard's rows and their blocks are updated where they are (Note [8-bit states])
        param, grad, m_codes, r_codes, m_scale, r_scale, step_t = map(local, tensors)
        rows, cols = _8bit.rows_cols(param.shape)
        p = param.reshape(rows, cols).to(torch.float32, copy=True)
        g = grad.reshape(rows, cols).to(torch.float32)
        if maximize:
            g = -g
        m = _8bit.decode_signed(m_codes.view(torch.int8).reshape(rows, cols), m_scale)
        r = _8bit.decode_root(r_codes.reshape(rows, cols), r_scale)
        v = r * r

        t = host_value(step_t)                             # t, already counted (Note [step counters])
        p.mul_(1 - lr * weight_decay)                      # theta <- theta * (1 - lr * wd)
        m.lerp_(g, 1 - beta1)                              # m_t = b1 m + (1 - b1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)      # v_t = b2 v + (1 - b2) g^2
        if correct_bias:
            bias_correction1 = _one_minus_pow(beta1, t)
            bias_correction2 = _one_minus_pow(beta2, t)
        else:
            bias_correction1 = bias_correction2 = 1.0
        r = v.sqrt()
        denom = (r / bias_correction2**0.5).add_(eps)      # sqrt(v_hat) + eps
        p.addcdiv_(m, denom, value=-lr / bias_correction1)  # theta -= lr m_hat / denom

        codes, scale = _8bit.encode_signed(m)
        m_codes.view(torch.int8).copy_(codes.reshape(m_codes.shape))
        m_scale.copy_(scale)
        codes, scale = _8bit.encode_root(r, _8bit.root_seed(t))  # stochastic codes, unbiased for v
        r_codes.copy_(codes.reshape(r_codes.shape))
        r_scale.copy_(scale)
        _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _foreach_adamw8bit(*lists: list[Tensor], **hyper: Any) -> None:
    """The foreach path takes the reference for 8-bit states (there is no foreach form of a
    blockwise encode worth its temporaries)."""
    _single_tensor_adamw8bit(*lists, **hyper)


from . import _fused_cpu  # noqa: E402 - the C backend's, beside it
from .adamw import _bias_correction, _c_scalars, _stack  # noqa: E402

# The C loop (Note [fused CPU] in _fused_cpu.py, csrc/8bit_loop.c): a block of 256 values
# of a row at a time, its moments decoded into the locals m and r = sqrt(v) before this body and
# encoded after it. The operations are the reference's, in its order, as torch's CPU kernels
# compute them: lerp and addcmul are one fused multiply-add each (torch's vectorised kernels),
# addcdiv is p + (value m) / denom.
_ADAMW8BIT_KERNEL = _fused_cpu.Kernel(
    name="adamw8bit",
    states=("m", "r"),
    codes=("signed", "root"),
    scalars=("decay", "w1", "beta2", "w2", "eps"),
    per_tensor=("neg_step_size", "bc2_sqrt", "step"),
    body="""
        T v = r * r;                                    /* v = r^2: the second moment, decoded */
        m = LERP(m, g, w1);                             /* m_t = b1 m + (1 - b1) g, with w1 = 1 - b1 */
        v = FMA(w2 * g, g, v * beta2);                  /* v_t = b2 v + (1 - b2) g^2, with w2 = 1 - b2 */
        r = SQRT(v);                                    /* what is stored: sqrt(v_t) */
        T denom = QUOTIENT(r, bc2_sqrt) + eps;          /* r / sqrt(1 - b2^t) + eps, correctly rounded */
        p = p * decay + neg_step_size * m / denom;      /* theta (1 - lr wd) - lr / (1 - b1^t) m_t / denom */
    """,
)


def _fused_c_adamw8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The C loop: one pass over the blocks of all tensors, one call per parameter dtype.

    Bit for bit the reference where torch's float32 ``sqrt`` is correctly rounded; torch's
    CPU ``sqrt`` (MKL's vector math where torch is built with it) may be one unit in the last
    place off, so a value whose code lies on a rounding boundary may get the neighbouring code,
    and r (and the parameter) may differ by about one float32 rounding (tests/test_8bit_c.py)."""
    lr = float(lr)  # read once on the host; the scalars stay float64 until the kernel
    steps = _stack(state_steps).tolist()  # read once: the bias corrections, and the seeds of v's codes
    per_tensor = [(*_bias_correction(lr, beta1, beta2, t, correct_bias), t) for t in steps]
    _fused_cpu.run(_ADAMW8BIT_KERNEL, params, grads, [exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales],
                   _c_scalars(lr, beta1, beta2, eps, weight_decay), per_tensor, maximize=maximize,
                   rounding_seeds=rounding_seeds)


BACKENDS = _dispatch.Backends(
    names=("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "state_steps"),
    reference=_single_tensor_adamw8bit,
    foreach=_foreach_adamw8bit,
    c=_fused_c_adamw8bit,
    c_kernel=_ADAMW8BIT_KERNEL,
    n_states=4,
    triton="adamw8bit",
    eight_bit=True,
    rounding=frozenset({"reference", "foreach", "c", "triton"}),
)
AdamW.backends_8bit = BACKENDS
