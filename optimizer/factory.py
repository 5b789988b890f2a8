"""Configuring optimizers for training: one registry of names, parameter groups
with and without weight decay, and config files (YAML or JSON, loaded safely).

The registry :data:`OPTIMIZERS` is the one list of optimizer names: it feeds
:func:`create_optimizer`, the command line's choices and the tests.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .adamw import AdamW
from .lion import Lion

__all__ = [
    "OPTIMIZERS",
    "ConfigError",
    "OptimizerSpec",
    "clip_grad_norm_",
    "create_optimizer",
    "load_config",
    "param_groups",
]

log = logging.getLogger("optimizer")


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its class and the settings a small LLaMA trains well with."""

    cls: type[torch.optim.Optimizer]
    lr: float
    weight_decay: float
    summary: str


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(AdamW, lr=3e-3, weight_decay=0.1, summary="Adam with decoupled weight decay"),
    # Lion: lr 3-10x smaller and weight decay 3-10x larger than AdamW's (Chen et al. 2023)
    "lion": OptimizerSpec(Lion, lr=3e-4, weight_decay=1.0, summary="EvoLved Sign Momentum, one state tensor"),
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the allowed values."""


def _spec(name: str) -> OptimizerSpec:
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ConfigError(f"Invalid optimizer name: {name!r}; valid names are {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def param_groups(
    model_or_params: torch.nn.Module | Iterable[Any],
    weight_decay: float,
    no_decay: Iterable[str] = (),
    *,
    decay_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """Split parameters into a group with weight decay and one without.

    Without decay: every tensor with fewer than 2 dimensions (biases, norm
    weights, scalars), any parameter whose name contains one of ``no_decay``,
    and embedding tables when ``decay_embeddings`` is False. Decay shrinks
    weights towards zero; for gains and offsets that only distorts the layer
    they scale, which is why GPT-style training exempts them.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    no_decay = tuple(no_decay)
    if isinstance(model_or_params, torch.nn.Module):
        embeddings = {id(m.weight) for m in model_or_params.modules() if isinstance(m, torch.nn.Embedding)}
        named = list(model_or_params.named_parameters())
    else:
        embeddings = set()
        items = list(model_or_params)
        named = [it if isinstance(it, tuple) else (f"param{i}", it) for i, it in enumerate(items)]
    decay, exempt = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(s in name for s in no_decay) or (not decay_embeddings and id(p) in embeddings)
        (exempt if skip else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "group": "decay"})
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0, "group": "no_decay"})
    if not groups:
        raise ValueError("Invalid model_or_params: no trainable parameters (all have requires_grad=False)")
    return groups


def create_optimizer(
    model_or_params: torch.nn.Module | Iterable[Any],
    name: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    no_decay: Iterable[str] = (),
    *,
    decay_embeddings: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a registered optimizer with decay / no-decay parameter groups (see :func:`param_groups`).

    ``lr`` and ``weight_decay`` default to the registry's values for ``name``;
    other keywords (``betas``, ``eps``, ``correct_bias``, ...) go to the class.
    The counts are logged on the ``optimizer`` logger and kept in each group's
    ``"group"`` key.
    """
    spec = _spec(name)
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    groups = param_groups(model_or_params, weight_decay, no_decay, decay_embeddings=decay_embeddings)
    allowed = [k for k in inspect.signature(spec.cls.__init__).parameters if k not in ("self", "params")]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ConfigError(f"Invalid argument for optimizer {name!r}: {unknown[0]!r}; it takes {allowed}")
    try:
        opt = spec.cls(groups, lr=lr, **kwargs)
    except TypeError as err:  # a value of the wrong type
        raise ConfigError(f"Invalid argument for optimizer {name!r}: {err}") from None
    log.info("%s", describe_groups(opt))
    return opt


def describe_groups(opt: torch.optim.Optimizer) -> str:
    """One line: how many tensors and parameters each group holds, and their weight decay."""
    parts = []
    for g in opt.param_groups:
        n = sum(p.numel() for p in g["params"])
        parts.append(f"{g.get('group', 'group')}: {len(g['params'])} tensors, {n:,} params, weight_decay={g['weight_decay']}")
    peak = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])  # a scheduler may have moved lr
    return f"{type(opt).__name__}(lr={float(peak):.3g}) " + "; ".join(parts)


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients by their global norm; returns the norm before clipping.

    Call it after ``backward()`` and before ``optimizer.step()`` (with a
    GradScaler, after ``scaler.unscale_(optimizer)``). All gradients are scaled
    by ``min(1, max_norm / total_norm)``, so their direction is kept: this
    guards against the rare huge step that a loss spike would otherwise cause.
    It is ``torch.nn.utils.clip_grad_norm_`` (foreach where it can) with the
    argument checked.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (0 < max_norm < math.inf):
        raise ValueError(f"Invalid max_norm: {max_norm!r} (must be a finite number > 0)")
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


def load_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``, with ``yaml.safe_load``) or JSON file into a dict; a syntax
    error names the file, line and column. YAML is read as PyYAML does (YAML 1.1: ``1e-3``, without a
    dot, is a string; the command line reads numeric text as a number where a number is expected)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"Invalid config: {str(path)!r} is not a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("Reading YAML configs needs PyYAML: pip install 'clearoptim[demo]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)  # 0-based
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"Invalid config {where}: not valid YAML ({what})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"Invalid config {path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    else:
        raise ConfigError(f"Invalid config {str(path)!r}: the suffix must be one of ['.json', '.yaml', '.yml']")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid config {str(path)!r}: the top level must be a mapping, got {type(data).__name__}")
    return data
