"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

Read top to bottom: the class (checks, state), the functional entry ``adamw``,
then the backends, all with one signature (Note [backends] in _dispatch.py):
``_single_tensor_adamw`` is the reference (the update of one tensor is
``_adamw_update``), ``_multi_tensor_adamw`` the foreach path, ``_fused_c_adamw``
the C loop (its update is ``_ADAMW_KERNEL``), ``_fused_torch_adamw`` torch's own
fused CPU kernel; the Triton kernel is in _fused_triton.py. Last, the backends for
8-bit states (Note [8-bit states] in _8bit.py): the same update between a decode and
an encode. Swapping backends changes speed, never results beyond rounding.

Every form of the update sits in this one file, so that a reader compares the
reference, the C body and the 8-bit forms on one page.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _dispatch, _fused_cpu, _rounding
from ._base import Optimizer
from ._checks import (
    check_backend,
    check_betas,
    check_flag,
    check_lr,
    check_nonnegative,
    check_precision,
    check_torch_adamw_options,
    plain,
)
from ._tensors import as_real, compute_dtype, foreach_buckets, group_by_device_and_dtype, host_value, local, step_device

__all__ = ["AdamW", "adamw"]


class AdamW(Optimizer):
    r"""AdamW, Adam with decoupled weight decay.

    .. code-block:: text

        input: lr (gamma), betas (beta1, beta2), eps, weight_decay (lambda),
               correct_bias, maximize, params theta_0, objective f
        init:  m_0 = 0 (exp_avg), v_0 = 0 (exp_avg_sq), t = 0 (step)
        for each step:
            t   <- t + 1
            g   <- grad f(theta_{t-1})          (-grad if maximize)
            theta <- theta_{t-1} * (1 - gamma * lambda)      # decoupled decay
            m_t <- beta1 * m_{t-1} + (1 - beta1) * g
            v_t <- beta2 * v_{t-1} + (1 - beta2) * g^2
            if correct_bias:
                m_hat <- m_t / (1 - beta1^t)
                v_hat <- v_t / (1 - beta2^t)
            else:
                m_hat <- m_t ;  v_hat <- v_t
            theta_t <- theta - gamma * m_hat / (sqrt(v_hat) + eps)
        return theta_t

    This is the AdamW paper's Algorithm 2 as torch.optim.AdamW writes it: the paper's step
    size and schedule multiplier are one learning rate ``lr``, set by a scheduler, which also
    scales the decay. With the defaults it is exactly ``torch.optim.AdamW``.

    Note [eps placement]: eps is added to the *bias-corrected* root, ``sqrt(v_hat) + eps``, as
    in Algorithm 1 of the Adam paper and in torch.optim, so eps means the same thing at every
    step. The Adam paper's "more efficient" ordering (end of its Section 2),
    ``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps)``, is this update with
    ``eps / sqrt(1 - beta2^t)`` for eps: identical when eps is 0, damping the first steps more
    otherwise. The decay is applied first, to the parameter before the Adam step, as
    torch.optim does. How the course material this library accompanies (the CMU minllama
    assignment, the Intro2LLM lesson L07) writes AdamW, and how it maps to this:
    docs/algorithms.md, "The course material".

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or a one-element tensor), default 1e-3.
        betas: coefficients of the running averages of the gradient and its
            square, default (0.9, 0.999); each in [0, 1).
        eps: added to the denominator for numerical stability, default 1e-8.
        weight_decay: decoupled weight decay coefficient, default 1e-2.
        correct_bias: divide the moments by ``1 - beta^t`` (default True).
            False is the BERT / Hugging Face legacy variant.
        maximize: maximise the objective instead of minimising it.
        foreach: use the multi-tensor implementation (True) or not (False).
        fused: use the fused kernels (True) or not (False): one pass over
            memory per element instead of one per operation (a C loop on
            CPU, Triton kernels on CUDA). With both None (default) the
            fastest correct path is picked: fused on CPU and CUDA (see
            docs/design.md, "Backends").
        state_dtype: how the moments are stored. None (default: float32 for
            bf16/fp16 parameters, the parameter's dtype otherwise), torch.float32,
            torch.bfloat16 (math still in float32), or torch.uint8: 8-bit states,
            one byte per value and one float32 scaling factor per block of 256
            values of a row (Note [8-bit states] in _8bit.py).
        stochastic_rounding: round bf16/fp16 parameters stochastically instead of
            to nearest (Note [stochastic rounding] in _rounding.py), default False.
        seed: the seed of those random bits, default 0 (a run is reproducible).
        min_8bit_size: with ``state_dtype=torch.uint8``, tensors with fewer values
            (or fewer than 2 dimensions) keep float32 states, default 4096.
        amsgrad, capturable, differentiable: torch.optim.AdamW's options, taken at
            its default (False) only: code that spells them out runs unchanged.

    State per parameter: ``step`` (float32 scalar tensor; on the parameter's
    GPU for CUDA parameters, so that the fused kernels read it without a
    sync), ``exp_avg``, ``exp_avg_sq`` (in ``state_dtype``; 8-bit states add
    their scaling factors ``exp_avg_scale``, ``exp_avg_sq_scale``). Complex
    parameters are updated as pairs of reals.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    counter_keys = ("step",)
    nonnegative_keys = ("exp_avg_sq",)
    checkpoint_keys = ("lr", "betas", "eps", "weight_decay")
    backends: _dispatch.Backends  # set at the end of this file, once the backends are defined

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        correct_bias: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        min_8bit_size: int = _8bit.MIN_8BIT_SIZE,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_torch_adamw_options(amsgrad, capturable, differentiable)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            maximize=maximize, foreach=foreach, fused=fused, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, seed=seed, min_8bit_size=min_8bit_size,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_flag("correct_bias", group["correct_bias"])
        check_flag("maximize", group["maximize"])
        check_backend(group)
        check_precision(group)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": torch.tensor(0.0, dtype=torch.float32, device=step_device(param)),
                **self._zero_states(param, group)}

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = map(plain, group["betas"])
        return dict(lr=plain(group["lr"]), beta1=beta1, beta2=beta2, eps=plain(group["eps"]),
                    weight_decay=plain(group["weight_decay"]), correct_bias=group["correct_bias"],
                    maximize=group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, float | None]:
        lr = group["lr"]
        lr = None if isinstance(lr, Tensor) and lr.device.type != "cpu" else float(lr)  # no sync to check it
        wd, beta1 = group["weight_decay"], group["betas"][0]
        return {
            "learning rate lr": lr,
            "eps": group["eps"],
            "weight_decay": wd,
            "lr * weight_decay": None if lr is None else lr * wd,
            # the largest step size, lr / (1 - beta1^t) at t = 1
            "step size lr / (1 - beta1)": None if lr is None or not group["correct_bias"] else lr / (1 - beta1),
        }


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool = True,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """Functional AdamW: updates ``params``, the moments and ``state_steps`` in place.

    See :class:`AdamW` for the algorithm; ``foreach``/``fused`` choose the backend (Note
    [backends]); ``grad_scale``/``found_inf`` as torch.amp.GradScaler passes them (Note [GradScaler]).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 correct_bias=correct_bias, maximize=maximize)
    if rounding_seeds is not None:  # Note [stochastic rounding]: one 32-bit seed per tensor
        hyper["rounding_seeds"] = list(rounding_seeds)
    _dispatch.step(_BACKENDS, [params, grads, exp_avgs, exp_avg_sqs, state_steps], hyper, foreach=foreach,
                   fused=fused, grad_scale=grad_scale, found_inf=found_inf)


def _single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
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
    """The reference: one tensor at a time, each through :func:`_adamw_update`."""
    lr = host_value(lr)  # a number (a tensor under torch.compile)
    for i, (param, grad, m, v, step_t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        # math in float32 or better (Note [state precision]); .to() is a no-op where no cast is needed
        m_r, v_r, param_r = as_real(m), as_real(v), as_real(param)
        dtype = compute_dtype(param_r.dtype, m_r.dtype)
        p, m, v = param_r.to(dtype), m_r.to(dtype), v_r.to(dtype)
        g = as_real(grad).to(dtype)
        if maximize:
            g = -g

        _adamw_update(p, g, m, v, host_value(step_t), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, correct_bias=correct_bias)
        for low, high in ((m_r, m), (v_r, v)):
            if high is not low:                            # low precision: round the result once
                low.copy_(high)
        if p is not param_r:                               # to nearest, or stochastically (Note [stochastic rounding])
            _rounding.store_param(param_r, p, None if rounding_seeds is None else rounding_seeds[i])


def _adamw_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, t: float | Tensor, *, lr: float | Tensor,
                  beta1: float, beta2: float, eps: float, weight_decay: float, correct_bias: bool) -> Tensor:
    """AdamW's update of one tensor, in place on ``p``, ``m`` and ``v`` (float32 or wider): the
    equations of :class:`AdamW`, one line each, at step ``t`` (already counted, Note [step
    counters]). Returns ``sqrt(v_t)``. Both references call it, the 8-bit one between a decode
    and an encode of the moments (it stores that root)."""
    p.mul_(1 - lr * weight_decay)                      # theta <- theta * (1 - lr * wd)
    m.lerp_(g, 1 - beta1)                              # m_t = b1 m + (1 - b1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)      # v_t = b2 v + (1 - b2) g^2
    if correct_bias:
        bias_correction1 = _one_minus_pow(beta1, t)   # m_hat = m_t / (1 - b1^t)
        bias_correction2 = _one_minus_pow(beta2, t)   # v_hat = v_t / (1 - b2^t)
    else:
        bias_correction1 = bias_correction2 = 1.0
    root = v.sqrt()
    denom = (root / bias_correction2**0.5).add_(eps)   # sqrt(v_hat) + eps
    step_size = lr / bias_correction1
    if isinstance(step_size, Tensor):                  # under torch.compile: no tensor value= in addcdiv_
        p.sub_(m / denom * step_size)
    else:
        p.addcdiv_(m, denom, value=-step_size)         # theta -= lr m_hat / denom
    return root


def _one_minus_pow(beta: float, t: float | Tensor) -> float | Tensor:
    """1 - beta^t. For a tensor t (under torch.compile) as -expm1(t ln beta): ``1 - beta**t``
    in float32 loses the digits that matter (6e-6 relative at beta = 0.999, t = 1)."""
    if isinstance(t, Tensor):
        return -torch.expm1(t * (math.log(beta) if beta > 0 else -math.inf))
    return 1 - beta**t


def _multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
) -> None:
    """The same update with torch._foreach ops, one bucket per (device, dtype)."""
    for b in foreach_buckets(params, grads, exp_avgs, exp_avg_sqs, counters=state_steps, maximize=maximize, lr=lr):
        (b_m, b_v), b_steps = b.states, b.counters
        if weight_decay != 0:
            torch._foreach_mul_(b.params, 1 - b.lr * weight_decay)
        torch._foreach_lerp_(b_m, b.grads, 1 - beta1)
        torch._foreach_mul_(b_v, beta2)
        torch._foreach_addcmul_(b_v, b.grads, b.grads, 1 - beta2)

        if correct_bias and (b_steps[0].device.type != "cpu" or torch.compiler.is_compiling()):
            # step counts on the GPU (they live there for CUDA parameters), or traced: no .item(), no sync
            bc1, bc2_sqrt = _device_bias_corrections(b_steps, beta1, beta2)
        elif correct_bias:
            ts = [s.item() for s in b_steps]
            bc1 = [1 - beta1**t for t in ts]
            bc2_sqrt = [(1 - beta2**t) ** 0.5 for t in ts]
        else:
            bc1 = bc2_sqrt = [1.0] * len(b_steps)
        denom = torch._foreach_sqrt(b_v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        if isinstance(b.lr, Tensor) or isinstance(bc1[0], Tensor) or torch.compiler.is_compiling():
            # theta -= m / (denom * bc1 / lr): the tensor lr stays on the device, no sync
            torch._foreach_mul_(denom, bc1)
            torch._foreach_div_(denom, b.lr)
            torch._foreach_addcdiv_(b.params, b_m, denom, -1.0)
        else:
            torch._foreach_addcdiv_(b.params, b_m, denom, [-b.lr / bc for bc in bc1])


def _device_bias_corrections(steps: list[Tensor], beta1: float, beta2: float) -> tuple[list[Tensor], list[Tensor]]:
    """(1 - beta1^t, sqrt(1 - beta2^t)) as tensors where the step counts t are, computed with
    foreach ops: nothing is read back to the host. As -expm1(t ln beta): ``1 - beta**t`` in
    float32 loses the digits that matter (6e-6 relative at beta2 = 0.999, t = 1)."""
    def one_minus_pow(beta: float) -> list[Tensor]:
        x = torch._foreach_mul(steps, math.log(beta) if beta > 0 else -math.inf)
        torch._foreach_expm1_(x)
        torch._foreach_neg_(x)
        return x

    bc2 = one_minus_pow(beta2)
    torch._foreach_sqrt_(bc2)
    return one_minus_pow(beta1), bc2


_ADAMW_KERNEL = _fused_cpu.Kernel(
    name="adamw",
    states=("m", "v"),
    scalars=("decay", "w1", "beta2", "w2", "eps"),
    per_tensor=("neg_step_size", "bc2_sqrt"),
    body="""
        m = LERP(m, g, w1);                             /* m_t = b1 m + (1 - b1) g, with w1 = 1 - b1 */
        v = FMA(w2 * g, g, v * beta2);                  /* v_t = b2 v + (1 - b2) g^2, w2 = 1 - b2 (addcmul: one fma) */
        T denom = SQRT(v) / bc2_sqrt + eps;             /* sqrt(v_t / (1 - b2^t)) + eps */
        p = p * decay + neg_step_size * m / denom;      /* theta (1 - lr wd) - lr / (1 - b1^t) m_t / denom */
    """,
)


def _fused_c_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
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
    """The C loop (Note [fused CPU]): one pass per element over all tensors; bf16/fp16
    parameters rounded stochastically where ``rounding_seeds`` are given (Note [stochastic rounding])."""
    lr = float(lr)  # read once on the host; the scalars stay float64 until the kernel
    _fused_cpu.run(_ADAMW_KERNEL, params, grads, [exp_avgs, exp_avg_sqs], _c_scalars(lr, beta1, beta2, eps,
                   weight_decay), bias_corrections(lr, beta1, beta2, state_steps, correct_bias), maximize=maximize,
                   rounding_seeds=rounding_seeds)


def _c_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> list[float]:
    """The values of ``_ADAMW_KERNEL.scalars`` (and of the 8-bit kernel's), float64 until the kernel."""
    return [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps]


def bias_corrections(lr: float, beta1: float, beta2: float, steps: list[Tensor],
                      correct_bias: bool) -> list[tuple[float, float]]:
    """Per tensor (-lr / (1 - b1^t), sqrt(1 - b2^t)), t already counted (Note [step counters]),
    for the kernels (the C loops and Triton's, SparseAdamW's too), computed as the reference
    does, in Python floats: torch's float64 pow and sqrt round differently (the float32 values
    the kernels use would then differ in rare steps)."""
    counts = _stack(steps).tolist() if correct_bias else [0.0] * len(steps)  # (nothing read where unused)
    return [_bias_correction(lr, beta1, beta2, t, correct_bias) for t in counts]


def _bias_correction(lr: float, beta1: float, beta2: float, t: float, correct_bias: bool) -> tuple[float, float]:
    """(-lr / (1 - b1^t), sqrt(1 - b2^t)) for one step count t, in Python floats; (-lr, 1) without correction."""
    if not correct_bias:
        return -lr, 1.0
    return -lr / _one_minus_pow(beta1, t), _one_minus_pow(beta2, t) ** 0.5


def _stack(steps: list[Tensor]) -> Tensor:
    """The step counts as one float64 vector (one op for any number of counters)."""
    try:
        return torch.stack(steps).to(torch.float64)
    except RuntimeError:  # one-element counters of different shapes, e.g. (1,) from an older checkpoint
        return torch.stack([s.reshape(()) for s in steps]).to(torch.float64)


def _fused_torch_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
) -> None:
    """torch's own fused CPU kernel, which computes exactly our update where the dispatcher
    sends it (correct_bias, float32/float64 state of the parameter's dtype): bit-equal to
    ``torch.optim.AdamW(fused=True)``."""
    assert correct_bias
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if any(map(Tensor.is_complex, params)):
        lists = tuple([as_real(t) for t in lst] for lst in lists)
    buckets = group_by_device_and_dtype(*lists)
    for b_p, b_g, b_m, b_v, b_steps in buckets.values():
        torch._fused_adamw_(b_p, b_g, b_m, b_v, [], b_steps, lr=float(lr), beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize)


_BACKENDS = _dispatch.Backends(
    names=("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"),
    reference=_single_tensor_adamw,
    foreach=_multi_tensor_adamw,
    c=_fused_c_adamw,
    c_kernel=_ADAMW_KERNEL,
    n_states=2,
    triton="adamw",
    rounding=frozenset({"reference", "c", "triton"}),  # Note [stochastic rounding]
    torch=_fused_torch_adamw,
    torch_applies=operator.itemgetter("correct_bias"),
)
AdamW.backends = _BACKENDS

# ----- 8-bit states (Note [8-bit states] in _8bit.py) ---------------------------------------
# The same update between a decode and an encode of the moments: each step decodes them,
# updates in float32 and encodes them again. ``AdamW8bit`` (adamw8bit.py) is AdamW with these
# by default.


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

        t = host_value(step_t)
        r = _adamw_update(p, g, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                          correct_bias=correct_bias)

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


# The C loop (Note [fused CPU] in _fused_cpu.py, csrc/8bit_loop.c): a block of 256 values of a
# row at a time, its moments decoded into the locals m and r = sqrt(v) before this body and
# encoded after it. Its body is _ADAMW_KERNEL's with two differences, which is why it is written
# out: it keeps the root r (what is stored) rather than v, and divides by bc2_sqrt with QUOTIENT,
# a correctly rounded division by a loop invariant that exists for float32 only (the float kernel
# also has a float64 variant). The operations are the reference's, in its order, as torch's CPU
# kernels compute them: lerp and addcmul are one fused multiply-add each, addcdiv is
# p + (value m) / denom.
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


_BACKENDS_8BIT = _dispatch.Backends(
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
AdamW.backends_8bit = _BACKENDS_8BIT
