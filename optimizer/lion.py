"""Lion: EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of
Optimization Algorithms", arXiv:2302.06675, Algorithm 2).

Read top to bottom: the class, the functional entry ``lion``, then the
backends with one signature (Note [backends] in _dispatch.py):
``_single_tensor_lion`` (the reference; the update of one tensor is ``_lion_update``),
``_multi_tensor_lion`` (foreach) and ``_fused_c_lion`` (the C loop; its update is
``_LION_KERNEL``); the Triton kernel is in _fused_triton.py. Last, the backends for 8-bit
states (Note [8-bit states] in _8bit.py): the same update between a decode and an encode.
"""

from __future__ import annotations

import dataclasses
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
    check_not_set,
    check_precision,
    plain,
)
from ._tensors import as_real, compute_dtype, foreach_buckets, host_value, local

__all__ = ["Lion", "lion"]


class Lion(Optimizer):
    r"""Lion, EvoLved Sign Momentum.

    .. code-block:: text

        input: lr (gamma), betas (beta1, beta2), weight_decay (lambda),
               maximize, params theta_0, objective f
        init:  m_0 = 0 (exp_avg)
        for each step:
            g     <- grad f(theta_{t-1})            (-grad if maximize)
            c     <- beta1 * m_{t-1} + (1 - beta1) * g     # interpolation, used once
            theta <- theta_{t-1} * (1 - gamma * lambda)    # decoupled decay
            theta_t <- theta - gamma * sign(c)             # sign(0) = 0
            m_t   <- beta2 * m_{t-1} + (1 - beta2) * g     # the momentum kept
        return theta_t

    Two betas, on purpose: the update direction interpolates with ``beta1``
    (0.9) while the momentum that is kept tracks the gradient with ``beta2``
    (0.99), which gives the update a longer memory than its direction. Beside
    AdamW, Lion keeps a momentum but no second moment: the sign takes the place
    of ``m_hat / (sqrt(v_hat) + eps)``. How the Intro2LLM lesson L07 writes Lion
    (one beta, the case ``betas=(b, b)``), and how it maps to this:
    docs/algorithms.md, "The course material".

    Because every coordinate moves by exactly ``lr``, the paper advises a
    learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger,
    keeping ``lr * weight_decay`` about the same.

    A NaN in a gradient makes that coordinate's momentum NaN for good, and
    ``sign(NaN) = 0``: the coordinate stops moving (but for weight decay) and
    never recovers, silently (lion-pytorch behaves the same). Skip such steps,
    e.g. with ``torch.amp.GradScaler``, which our step honours, or check
    ``torch.isfinite`` of the loss before stepping.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or one-element tensor), default 1e-4.
        betas: (beta1, beta2), default (0.9, 0.99); each in [0, 1).
        weight_decay: decoupled weight decay coefficient, default 0.0.
        maximize: maximise the objective instead of minimising it.
        foreach: use the multi-tensor implementation; None picks (see AdamW).
        fused: use the fused kernels (see AdamW); None picks.
        state_dtype: None, torch.float32, torch.bfloat16 or torch.uint8 (8-bit
            states; see AdamW).
        stochastic_rounding: round bf16/fp16 parameters stochastically (see AdamW).
        seed: the seed of those random bits, default 0.
        min_8bit_size: smaller tensors keep float32 states with
            ``state_dtype=torch.uint8`` (see AdamW), default 4096.
        use_triton, decoupled_weight_decay: lion-pytorch's options. use_triton
            either way (on CUDA the fused backend is Triton already);
            decoupled_weight_decay at its default (False) only: for True pass
            ``weight_decay / lr``, which is what it does.

    State per parameter: ``exp_avg`` only (in ``state_dtype``: by default float32
    for bf16/fp16 parameters, the parameter's dtype otherwise; 8-bit states add
    ``exp_avg_scale``). Complex parameters are updated as pairs of reals: the
    sign is taken of the real and the imaginary part separately.
    """

    state_keys = ("exp_avg",)
    backends: _dispatch.Backends  # set at the end of this file, once the backends are defined

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        min_8bit_size: int = _8bit.MIN_8BIT_SIZE,
    ) -> None:
        # lion-pytorch's options: use_triton is a choice of backend (ours picks Triton on CUDA by
        # itself: ``fused``), so either value runs; decoupled_weight_decay=True divides every
        # weight decay by the constructor's lr, which a caller does by passing it divided
        check_flag("use_triton", use_triton)
        check_not_set("decoupled_weight_decay", decoupled_weight_decay, "pass weight_decay / lr instead (what "
                      "lion-pytorch's option does: theta <- theta (1 - lr_t wd / lr))")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, seed=seed,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_flag("maximize", group["maximize"])
        check_backend(group)
        check_precision(group)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return self._zero_states(param, group)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = map(plain, group["betas"])
        return dict(lr=plain(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=plain(group["weight_decay"]),
                    maximize=group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, float | None]:
        lr = group["lr"]
        lr = None if isinstance(lr, Tensor) and lr.device.type != "cpu" else float(lr)  # no sync to check it
        wd = group["weight_decay"]
        return {"learning rate lr": lr, "weight_decay": wd, "lr * weight_decay": None if lr is None else lr * wd}


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """Functional Lion: updates ``params`` and ``exp_avgs`` in place. See :class:`Lion`;
    ``foreach``/``fused`` choose the backend (Note [backends]); ``grad_scale``/``found_inf``
    as torch.amp.GradScaler passes them (Note [GradScaler])."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)
    if rounding_seeds is not None:  # Note [stochastic rounding]: one 32-bit seed per tensor
        hyper["rounding_seeds"] = list(rounding_seeds)
    _dispatch.step(_BACKENDS, [params, grads, exp_avgs], hyper, foreach=foreach, fused=fused,
                   grad_scale=grad_scale, found_inf=found_inf)


def _single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The reference: one tensor at a time, each through :func:`_lion_update`."""
    lr = host_value(lr)  # a number (a tensor under torch.compile)
    for i, (param, grad, m) in enumerate(zip(params, grads, exp_avgs)):
        # math in float32 or better (Note [state precision]); .to() is a no-op where no cast is needed
        m_r, param_r = as_real(m), as_real(param)
        dtype = compute_dtype(param_r.dtype, m_r.dtype)
        p, m = param_r.to(dtype), m_r.to(dtype)
        g = as_real(grad).to(dtype)
        if maximize:
            g = -g

        _lion_update(p, g, m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        if m is not m_r:                            # low precision: round the result once
            m_r.copy_(m)
        if p is not param_r:                        # to nearest, or stochastically (Note [stochastic rounding])
            _rounding.store_param(param_r, p, None if rounding_seeds is None else rounding_seeds[i])


def _lion_update(p: Tensor, g: Tensor, m: Tensor, *, lr: float | Tensor, beta1: float, beta2: float,
                 weight_decay: float) -> None:
    """Lion's update of one tensor, in place on ``p`` and ``m`` (float32 or wider): the equations
    of :class:`Lion`, one line each. Both references call it, the 8-bit one between a decode
    and an encode of ``m``."""
    c = m.lerp(g, 1 - beta1)                    # c = b1 m + (1 - b1) g
    p.mul_(1 - lr * weight_decay)               # theta <- theta * (1 - lr * wd)
    p.sub_(torch.sign(c).mul_(lr))              # theta <- theta - lr sign(c) (exact product)
    m.lerp_(g, 1 - beta2)                       # m_t = b2 m + (1 - b2) g


def _multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The same update with torch._foreach ops, one bucket per (device, dtype)."""
    for b in foreach_buckets(params, grads, exp_avgs, maximize=maximize, lr=lr):
        (b_m,) = b.states
        update = torch._foreach_lerp(b_m, b.grads, 1 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_mul_(update, b.lr)           # lr * sign(c) is exact: the sign is -1, 0 or 1
        if weight_decay != 0:
            torch._foreach_mul_(b.params, 1 - b.lr * weight_decay)
        torch._foreach_sub_(b.params, update)
        torch._foreach_lerp_(b_m, b.grads, 1 - beta2)


_LION_KERNEL = _fused_cpu.Kernel(
    name="lion",
    states=("m",),
    scalars=("decay", "lr", "w1", "w2"),
    body="""
        T c = LERP(m, g, w1);            /* c = b1 m + (1 - b1) g, with w1 = 1 - b1 */
        p = p * decay - lr * SIGN(c);    /* theta (1 - lr wd) - lr sign(c) */
        m = LERP(m, g, w2);              /* m_t = b2 m + (1 - b2) g, with w2 = 1 - b2 */
    """,
)


def _fused_c_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The C loop (Note [fused CPU]): one pass per element over all tensors; bf16/fp16
    parameters rounded stochastically where ``rounding_seeds`` are given (Note [stochastic rounding])."""
    _fused_cpu.run(_LION_KERNEL, params, grads, [exp_avgs], _c_scalars(lr, beta1, beta2, weight_decay),
                   maximize=maximize, rounding_seeds=rounding_seeds)


def _c_scalars(lr: float | Tensor, beta1: float, beta2: float, weight_decay: float) -> list[float]:
    """The values of ``_LION_KERNEL.scalars`` (its 8-bit form's too): lr read once on the host,
    float64 until the kernel."""
    lr = float(lr)
    return [1 - lr * weight_decay, lr, 1 - beta1, 1 - beta2]


_BACKENDS = _dispatch.Backends(
    names=("params", "grads", "exp_avgs"),
    reference=_single_tensor_lion,
    foreach=_multi_tensor_lion,
    c=_fused_c_lion,
    c_kernel=_LION_KERNEL,
    n_states=1,
    triton="lion",
    rounding=frozenset({"reference", "c", "triton"}),  # Note [stochastic rounding]
)
Lion.backends = _BACKENDS

# ----- 8-bit states (Note [8-bit states] in _8bit.py) ---------------------------------------
# The same update between a decode and an encode of the momentum: each step decodes it, updates
# in float32 and encodes it again. ``Lion8bit`` (lion8bit.py) is Lion with these by default.


def _single_tensor_lion8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_scales: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The reference: Lion's update between a decode and an encode of the momentum."""
    lr = host_value(lr)
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_scales)):
        # FSDP2: each shard's rows and their blocks are updated where they are (Note [8-bit states])
        param, grad, m_codes, m_scale = map(local, tensors)
        rows, cols = _8bit.rows_cols(param.shape)
        p = param.reshape(rows, cols).to(torch.float32, copy=True)
        g = grad.reshape(rows, cols).to(torch.float32)
        if maximize:
            g = -g
        m = _8bit.decode_signed(m_codes.view(torch.int8).reshape(rows, cols), m_scale)

        _lion_update(p, g, m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)

        codes, scale = _8bit.encode_signed(m)
        m_codes.view(torch.int8).copy_(codes.reshape(m_codes.shape))
        m_scale.copy_(scale)
        _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _foreach_lion8bit(*lists: list[Tensor], **hyper: Any) -> None:
    """The foreach path takes the reference for 8-bit states."""
    _single_tensor_lion8bit(*lists, **hyper)


# The C loop (Note [fused CPU] in _fused_cpu.py, csrc/8bit_loop.c): a block of 256 values
# of a row at a time, the momentum decoded into the local m before the body and encoded after it;
# the body and its scalars are Lion's (above), whose operations are exactly the reference's.
_LION8BIT_KERNEL = dataclasses.replace(_LION_KERNEL, name="lion8bit", codes=("signed",))


def _fused_c_lion8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_scales: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The C loop: one pass over the blocks of all tensors, one call per parameter dtype. Bit
    for bit the reference where torch's float32 ``sqrt`` (of the encoding) is correctly rounded;
    see ``_fused_c_adamw8bit``."""
    _fused_cpu.run(_LION8BIT_KERNEL, params, grads, [exp_avgs, exp_avg_scales],
                   _c_scalars(lr, beta1, beta2, weight_decay), maximize=maximize, rounding_seeds=rounding_seeds)


_BACKENDS_8BIT = _dispatch.Backends(
    names=("params", "grads", "exp_avgs", "exp_avg_scales"),
    reference=_single_tensor_lion8bit,
    foreach=_foreach_lion8bit,
    c=_fused_c_lion8bit,
    c_kernel=_LION8BIT_KERNEL,
    n_states=2,
    triton="lion8bit",
    eight_bit=True,
    rounding=frozenset({"reference", "foreach", "c", "triton"}),
)
Lion.backends_8bit = _BACKENDS_8BIT
