"""Lion with an 8-bit momentum: :class:`Lion8bit`, and the backends that ``Lion`` uses for
the tensors whose state ``state_dtype=torch.uint8`` quantises (Note [8-bit states] in
_8bit.py). The update is Lion's, line for line (lion.py); each step decodes the momentum,
updates in float32 and encodes it again.

Backends, one signature: ``_single_tensor_lion8bit`` (the reference, plain torch),
``_fused_c_lion8bit`` (the C loop) and the Triton kernel in _fused_triton.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _dispatch, _rounding
from ._tensors import host_value, local
from .lion import Lion

__all__ = ["Lion8bit"]


class Lion8bit(Lion):
    """:class:`Lion` with ``state_dtype=torch.uint8`` by default: ``exp_avg`` of every tensor
    of at least 2 dimensions and ``min_8bit_size`` values takes one byte per value plus a
    float32 scale per 256 values (1.02 bytes per parameter instead of 4). The name and the
    leading arguments are bitsandbytes' (``bnb.optim.Lion8bit``)."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, state_dtype: torch.dtype | None = torch.uint8,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, betas, weight_decay, state_dtype=state_dtype, **kwargs)


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

        c = m.lerp(g, 1 - beta1)                    # c = b1 m + (1 - b1) g
        p.mul_(1 - lr * weight_decay)               # theta <- theta * (1 - lr * wd)
        p.sub_(torch.sign(c).mul_(lr))              # theta <- theta - lr sign(c)
        m.lerp_(g, 1 - beta2)                       # m_t = b2 m + (1 - b2) g

        codes, scale = _8bit.encode_signed(m)
        m_codes.view(torch.int8).copy_(codes.reshape(m_codes.shape))
        m_scale.copy_(scale)
        _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _foreach_lion8bit(*lists: list[Tensor], **hyper: Any) -> None:
    """The foreach path takes the reference for 8-bit states."""
    _single_tensor_lion8bit(*lists, **hyper)


from . import _fused_cpu  # noqa: E402 - the C backend's, beside it
from .lion import _LION_KERNEL, _c_scalars  # noqa: E402

# The C loop (Note [fused CPU] in _fused_cpu.py, csrc/8bit_loop.c): a block of 256 values
# of a row at a time, the momentum decoded into the local m before the body and encoded after it;
# the body and its scalars are Lion's (lion.py), whose operations are exactly the reference's.
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


BACKENDS = _dispatch.Backends(
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
Lion.backends_8bit = BACKENDS
