"""Lion with an 8-bit momentum by default: :class:`Lion8bit`, under the name bitsandbytes
users know. Its backends are Lion's for 8-bit states, in lion.py beside the float ones
(Note [8-bit states] in _8bit.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
