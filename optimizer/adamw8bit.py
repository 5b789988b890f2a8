"""AdamW with 8-bit states by default: :class:`AdamW8bit`, under the name bitsandbytes users
know. Its backends are AdamW's for 8-bit states, in adamw.py beside the float ones
(Note [8-bit states] in _8bit.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .adamw import AdamW

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
