"""Argument checks shared by the optimizers: each error names the argument and its value
(``Invalid lr: ...``), and is raised before anything changes (Note [two-phase step] in
``_base.py``); and the checks of a checkpoint's values. A leaf: it imports only torch,
``_tensors`` and ``_8bit``'s constants."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from ._8bit import MIN_8BIT_SIZE
from ._tensors import STATE_DTYPES, local

__all__ = [
    "check_backend",
    "check_betas",
    "check_fits",
    "check_flag",
    "check_precision",
    "check_lr",
    "check_nonnegative",
    "check_not_set",
    "check_state_dtype",
    "check_torch_adamw_options",
    "check_unit_interval",
    "count_error",
    "lowest",
    "plain",
]


def _as_float(name: str, value: Any, short: str | None = None) -> float | None:
    """``value`` as a float, or None for a one-element tensor on an accelerator (reading it would sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: Tensor {short or name} must be 1-element, got shape "
                             f"{tuple(value.shape)}")
        if value.device.type != "cpu":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (NumPy's scalars are Real)
        raise TypeError(f"Invalid {name}: expected a number, got {value!r} ({type(value).__name__})")
    return float(value)


def plain(value: Any) -> Any:
    """A hyper-parameter as the backends take it: a NumPy scalar as a float; floats, ints and
    tensors as they are (under torch.compile a float stays the graph's input)."""
    return value if isinstance(value, (float, int, Tensor)) else float(value)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and not (lr.is_floating_point()):
        raise ValueError(f"Invalid learning rate: a tensor lr must be floating point, got dtype {lr.dtype}")
    value = _as_float("learning rate", lr, "lr")
    if value is not None and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid learning rate: lr={value} (must be finite and >= 0)")


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        raise TypeError(f"Invalid {name}: expected a float, got a tensor ({value!r})")
    v = _as_float(name, value)
    if v is not None and not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name} value: {v} ({name} must be finite and >= 0)")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    if any(isinstance(b, Tensor) for b in betas):
        raise ValueError(f"Invalid betas: {betas!r}; tensor betas are not supported, pass floats")
    for i, beta in enumerate(betas):
        b = _as_float(f"beta parameter at index {i}", beta)
        if b is not None and not (0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")


def check_unit_interval(name: str, value: Any) -> None:
    """A number in [0, 1), such as a momentum (not a tensor: the backends take it as a Python number)."""
    if isinstance(value, Tensor):
        raise ValueError(f"Invalid {name}: {value!r}; a tensor {name} is not supported, pass a float")
    v = _as_float(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in [0, 1))")


def check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name}: {value!r} (must be {allowed})")


def check_not_set(name: str, value: Any, why: str) -> None:
    """An option another library's optimizer has and ours accepts at that library's default only
    (so code spelling the default out runs unchanged); ``why`` says what to do instead."""
    check_flag(name, value)
    if value:
        raise ValueError(f"Invalid {name}: True; {why}")


def check_torch_adamw_options(amsgrad: Any, capturable: Any, differentiable: Any) -> None:
    """torch.optim.AdamW's options that ours do not have, accepted at torch's default (False) so
    that code spelling them out runs; True is refused before anything is built."""
    check_not_set("amsgrad", amsgrad, "AMSGrad is not implemented here (torch.optim.AdamW has it)")
    check_not_set("capturable", capturable, "leave it out: the fused CUDA step (the default on a GPU) can be "
                  "captured in a CUDA graph as it is, the other backends cannot")
    check_not_set("differentiable", differentiable, "a step autograd can differentiate through is not "
                  "implemented here (torch.optim.AdamW has it)")


def check_state_dtype(value: Any) -> None:
    if value not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {value!r} (must be None, torch.float32, torch.bfloat16 "
                         "or torch.uint8)")


def check_precision(group: dict[str, Any]) -> None:
    """The precision options: 8-bit states (Note [8-bit states]) and stochastic rounding of
    bf16/fp16 parameters (Note [stochastic rounding])."""
    check_state_dtype(group.get("state_dtype"))
    check_flag("stochastic_rounding", group.get("stochastic_rounding", False))
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid seed: {seed!r} (an int in [0, 2**32))")
    size = group.get("min_8bit_size", MIN_8BIT_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (a positive int)")
    count = group.get("rounding_step", 0)  # (a group's count of stochastic steps, saved with it)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"Invalid rounding_step: {count!r} (the group's count of stochastic steps, an int >= 0)")


def check_backend(group: dict[str, Any]) -> None:
    check_flag("foreach", group["foreach"], allow_none=True)
    check_flag("fused", group["fused"], allow_none=True)
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid backend: foreach=True and fused=True; choose one")


def check_fits(scalars: dict[str, float | None], params: list[Tensor]) -> None:
    """The numbers an update multiplies by (``Optimizer._scalars``) must be finite in the
    precision of its math (float64 only when every parameter is float64), or the step would
    fail midway or write infinities (torch raises 'value cannot be converted to type float
    without overflow' after it has already changed some tensors)."""
    wide = all(p.dtype in (torch.float64, torch.complex128) for p in params)
    dtype = torch.float64 if wide else torch.float32
    limit = torch.finfo(dtype).max
    for name, value in scalars.items():
        if value is not None and not abs(value) <= limit:
            raise ValueError(f"Invalid {name} = {value:g}: it does not fit the {dtype} math of the update "
                             f"(at most {limit:.3g})")


# ----- the values of a checkpoint (``Optimizer.load_state_dict``, once per load) -----------------


def count_error(value: Any) -> str | None:
    """Why ``value`` cannot be a saved step count, or None: a count is a whole number >= 0, saved as
    a number (older torch.optim checkpoints) or a one-element real tensor. One read of a tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return f"a {value.dtype} tensor of shape {tuple(value.shape)} (expected one real number)"
        if value.device.type == "meta":
            return "a meta tensor, which holds no value"
        value = local(value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{value!r} (expected a number)"
    if not (math.isfinite(value) and value >= 0 and value == math.floor(value)):
        return f"{value!r} (a count of steps: a whole number >= 0)"
    return None


def lowest(t: Tensor) -> float:
    """The smallest value of a real floating tensor (of a complex one's reals), its NaNs ignored;
    +inf for no value (empty, all NaN, or a meta tensor, which holds none). One reduction; a
    second pass only where the first met a NaN (a checkpoint of a run that met one)."""
    t = local(t)
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0 or t.device.type == "meta":
        return math.inf
    low = float(t.amin())
    if math.isnan(low):
        low = float(torch.where(t.isnan(), math.inf, t).amin())
    return low
