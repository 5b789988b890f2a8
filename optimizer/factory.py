"""Configuring optimizers for training: one registry of names, parameter groups
with and without weight decay, and config files (YAML or JSON, loaded safely).

The registry :data:`OPTIMIZERS` is the one list of algorithms: it feeds
:func:`create_optimizer`, the command line's choices and the tests.
``create_optimizer(model, "muon")`` splits a model between Muon and AdamW by the rule of
:func:`muon_labels`, which a caller may replace (``labels=``). :data:`VARIANTS`
adds names for an algorithm with other defaults (``adamw8bit``, ``lion8bit``: 8-bit
states, as bitsandbytes names them), which :func:`create_optimizer` takes too.
Options that are a ``torch.dtype`` (``state_dtype``) may be given as text, as a config
file writes them: ``"fp32"``, ``"bf16"`` or ``"uint8"`` (:data:`STATE_DTYPES`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import pathlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .adamw import AdamW
from .adamw8bit import AdamW8bit
from .lion import Lion
from .lion8bit import Lion8bit
from .muon import Muon
from .sparse_adamw import SparseAdamW

__all__ = [
    "OPTIMIZERS",
    "ConfigError",
    "OptimizerSpec",
    "STATE_DTYPES",
    "VARIANTS",
    "clip_grad_norm_",
    "create_optimizer",
    "keyword_defaults",
    "load_config",
    "muon_labels",
    "param_groups",
    "state_dtype_of",
]

log = logging.getLogger("optimizer")


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its class and the settings a small LLaMA trains well with."""

    cls: type[torch.optim.Optimizer]
    lr: float
    weight_decay: float
    summary: str
    # the class's other keyword arguments that differ from its defaults here
    options: dict[str, Any] = field(default_factory=dict, hash=False)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(AdamW, lr=3e-3, weight_decay=0.1, summary="Adam with decoupled weight decay"),
    # Lion: lr 3-10x smaller and weight decay 3-10x larger than AdamW's (Chen et al. 2023)
    "lion": OptimizerSpec(Lion, lr=3e-4, weight_decay=1.0, summary="EvoLved Sign Momentum, one state tensor"),
    # Muon at Jordan et al.'s lr with the "original" scale, the rest at AdamW's lr: the pair that
    # trained the demo's model best
    "muon": OptimizerSpec(Muon, lr=0.02, weight_decay=0.1, options={"adamw_lr": 3e-3},
                          summary="Muon (orthogonalised momentum) for matrices, AdamW for the rest"),
}
# an algorithm of OPTIMIZERS under another name, with other defaults (the demo takes
# --state-dtype uint8 instead; these are for create_optimizer and configs)
VARIANTS: dict[str, OptimizerSpec] = {
    "adamw8bit": OptimizerSpec(AdamW8bit, lr=3e-3, weight_decay=0.1,
                               summary="AdamW with 8-bit states (state_dtype=torch.uint8)"),
    "lion8bit": OptimizerSpec(Lion8bit, lr=3e-4, weight_decay=1.0,
                              summary="Lion with an 8-bit momentum (state_dtype=torch.uint8)"),
}
# state_dtype as text (config files): the name -> the dtype
STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the allowed values."""


def _spec(name: str) -> OptimizerSpec:
    key = name.lower() if isinstance(name, str) else name
    names = {**OPTIMIZERS, **VARIANTS}
    if key not in names:
        raise ConfigError(f"Invalid optimizer name: {name!r}; valid names are {sorted(names)}")
    return names[key]


def keyword_defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments ``cls`` takes besides ``params``, with their defaults; through
    ``**kwargs`` to its base classes' (``AdamW8bit`` passes its others on to ``AdamW``)."""
    takes: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        forwards = False
        for k, p in inspect.signature(klass.__init__).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and k not in ("self", "params"):
                takes.setdefault(k, p.default)
        if not forwards:
            break
    return takes


def state_dtype_of(value: Any, name: str = "state_dtype") -> torch.dtype | None:
    """The ``state_dtype`` option as the optimizers take it: None or a ``torch.dtype`` as they
    are, a name of :data:`STATE_DTYPES` (``"uint8"``, as a config file writes it) as its dtype.
    Other values are an error naming ``name`` and the allowed names (a dtype the optimizers do
    not keep states in is theirs to refuse)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in STATE_DTYPES:
        return STATE_DTYPES[value]
    raise ConfigError(f"Invalid {name}: {value!r}; allowed values are {sorted(STATE_DTYPES)} (or a torch.dtype)")


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


def muon_labels(model: torch.nn.Module) -> dict[str, str]:
    """Which algorithm updates each trainable parameter of ``model``, by its name in
    ``model.named_parameters()``: the rule of ``create_optimizer(model, "muon")``.

    * ``"muon"``: the weight of every ``nn.Linear`` but the output layer;
    * ``"muon_conv"``: the kernel of every ``nn.Conv1d/2d/3d``, one matrix ``out x in * k``;
    * ``"muon_qkv"``: the ``in_proj_weight`` of every ``nn.MultiheadAttention`` (three matrices,
      query, key and value, stacked along its rows: each orthogonalised on its own); its
      ``out_proj`` is a Linear, so ``"muon"``;
    * ``"adamw"``: everything else: embeddings, the output layer, norms, biases, every tensor of
      fewer than 2 dimensions, and parameters of other modules (whose layout this rule cannot
      know: a custom stack of experts is a caller's ``"muon"``).

    The output layer is a Linear whose weight is shared with an embedding (tied); without one,
    the last Linear registered, if the model has no embedding or the Linear's outputs are an
    embedding's rows (an untied LM head; a model whose hidden width equals its vocabulary is
    still told apart, by order). Write another rule as a function of the model returning such a
    dict, and pass it as ``create_optimizer(model, "muon", labels=rule)``.
    """
    embeddings = [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tied = {id(m.weight) for m in embeddings}
    outputs = [m for m in linears if id(m.weight) in tied]
    if not outputs and linears:
        last = linears[-1]
        if not embeddings or last.out_features in {m.num_embeddings for m in embeddings}:
            outputs = [last]
    muon = {id(m.weight) for m in linears if m not in outputs}
    conv = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))}
    qkv = {id(m.in_proj_weight) for m in model.modules()
           if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None}
    return {name: "muon" if id(p) in muon else "muon_conv" if id(p) in conv else "muon_qkv" if id(p) in qkv
            else "adamw" for name, p in model.named_parameters() if p.requires_grad}


def _muon_groups(model_or_params: torch.nn.Module | Iterable[Any], no_decay: tuple[str, ...], decay_embeddings: bool,
                 labels: Callable[[torch.nn.Module], dict[str, str]] | None) -> list[dict[str, Any]]:
    """A model's parameters in Muon's and AdamW's groups (:func:`muon_labels`); for a list of
    tensors, those of at least 2 dimensions to Muon. Decay as :func:`param_groups` says, each
    group's own: the Muon groups take ``weight_decay``, AdamW's ``adamw_weight_decay``."""
    if isinstance(model_or_params, torch.nn.Module):
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        label_of = (labels or muon_labels)(model_or_params)
        embeddings = {id(m.weight) for m in model_or_params.modules() if isinstance(m, torch.nn.Embedding)}
    else:
        items = list(model_or_params)
        named = [it if isinstance(it, tuple) else (f"param{i}", it) for i, it in enumerate(items)]
        named = [(n, p) for n, p in named if p.requires_grad]
        label_of = {n: "muon" if p.dim() >= 2 else "adamw" for n, p in named}
        embeddings = set()
    allowed = {"muon", "muon_conv", "muon_qkv", "adamw"}
    bad = next((f"{n!r}: {label_of.get(n)!r}" for n, _ in named if label_of.get(n) not in allowed), None)
    if bad is not None:
        raise ConfigError(f"Invalid labels: {bad}; every trainable parameter needs one of {sorted(allowed)}")
    options = {"muon": {"use_muon": True}, "muon_conv": {"use_muon": True, "flatten": True},
               "muon_qkv": {"use_muon": True}, "adamw": {"use_muon": False}}
    # a fused QKV weight is split into its three blocks of rows; a model with attention of
    # several widths gets one group per width (a group has one split)
    for n, p in named:
        if label_of[n] == "muon_qkv" and (p.dim() != 2 or p.shape[0] % 3):
            raise ConfigError(f"Invalid labels: {n!r} is 'muon_qkv' but has shape {tuple(p.shape)} (three matrices "
                              "stacked along its rows: a 2-D tensor whose rows divide by 3)")
    widths = {p.shape[0] // 3 for n, p in named if label_of[n] == "muon_qkv"}
    groups: dict[str, dict[str, Any]] = {}
    for n, p in named:
        label = label_of[n]
        exempt = (p.dim() < 2 or any(s in n for s in no_decay)
                  or (label == "adamw" and not decay_embeddings and id(p) in embeddings))
        name = label
        extra = {}
        if label == "muon_qkv":
            extra = {"split": p.shape[0] // 3}
            name = label if len(widths) == 1 else f"{label}_{p.shape[0] // 3}"
        key = f"{name}_no_decay" if exempt else name if label != "adamw" else "adamw_decay"
        group = groups.setdefault(key, {"params": [], **options[label], **extra, "group": key})
        if exempt:
            group["weight_decay"] = 0.0
        group["params"].append(p)
    if not groups:
        raise ValueError("Invalid model_or_params: no trainable parameters (all have requires_grad=False)")
    matrices = [n for n, p in named if label_of[n] == "adamw" and p.dim() >= 2]
    log.info("muon split: %d tensors to Muon, %d to AdamW, of which matrices (embeddings, output layer): %s",
             sum(label_of[n] != "adamw" for n, _ in named), sum(label_of[n] == "adamw" for n, _ in named),
             ", ".join(matrices) or "none")
    order = ["muon", "muon_no_decay", "muon_conv", "muon_conv_no_decay",
             *(k for k in groups if k.startswith("muon_qkv")), "adamw_decay", "adamw_no_decay"]
    return [groups[k] for k in order if k in groups]


def create_optimizer(
    model_or_params: torch.nn.Module | Iterable[Any],
    name: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    no_decay: Iterable[str] = (),
    *,
    decay_embeddings: bool = True,
    labels: Callable[[torch.nn.Module], dict[str, str]] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a registered optimizer with decay / no-decay parameter groups (see :func:`param_groups`).

    ``name`` is one of :data:`OPTIMIZERS` or :data:`VARIANTS` (``"adamw8bit"``, ``"lion8bit"``).
    ``"adamw"`` for a model with sparse embeddings (``nn.Embedding`` or ``nn.EmbeddingBag``
    with ``sparse=True``) builds :class:`~optimizer.SparseAdamW`: AdamW for the dense
    parameters, the same update lazily for the embeddings' sparse gradients.
    ``lr`` and ``weight_decay`` default to the registry's values for ``name``;
    other keywords (``betas``, ``eps``, ``correct_bias``, ``state_dtype``,
    ``stochastic_rounding``, ``seed``, ``min_8bit_size``, ...) go to the class, with
    ``state_dtype`` also as text (``"fp32"``, ``"bf16"``, ``"uint8"``), as
    :func:`load_config` reads it from a file.
    ``"muon"`` builds :class:`~optimizer.Muon` with groups for Muon (``use_muon=True``) and
    for AdamW (``use_muon=False``): ``labels`` (default :func:`muon_labels`) says which
    parameter goes where; ``lr`` and ``weight_decay`` are Muon's, ``adamw_lr`` (default 3e-3)
    and ``adamw_weight_decay`` (default ``weight_decay``) AdamW's.
    The counts are logged on the ``optimizer`` logger and kept in each group's
    ``"group"`` key.
    """
    spec = _spec(name)
    cls = spec.cls
    sparse = cls is AdamW and isinstance(model_or_params, torch.nn.Module) and any(
        isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse for m in model_or_params.modules())
    if sparse:  # sparse gradients: AdamW's update, lazily for the embeddings' rows
        cls = SparseAdamW
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    if labels is not None and cls is not Muon:
        raise ConfigError(f"Invalid argument for optimizer {name!r}: 'labels' (it splits a model for 'muon')")
    if cls is Muon:
        groups = _muon_groups(model_or_params, tuple(no_decay), decay_embeddings, labels)
    else:
        groups = param_groups(model_or_params, weight_decay, no_decay, decay_embeddings=decay_embeddings)
    kwargs = {**spec.options, **kwargs}
    allowed = list(keyword_defaults(cls))
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        why = " (SparseAdamW, for the model's sparse embeddings)" if sparse else ""
        raise ConfigError(f"Invalid argument for optimizer {name!r}{why}: {unknown[0]!r}; it takes {allowed}")
    if "state_dtype" in kwargs:
        kwargs["state_dtype"] = state_dtype_of(kwargs["state_dtype"])
    if cls is Muon:  # (the Muon groups take weight_decay from the optimizer; AdamW's from adamw_weight_decay)
        kwargs["weight_decay"] = weight_decay
    try:
        opt = cls(groups, lr=lr, **kwargs)
    except TypeError as err:  # a value of the wrong type
        raise ConfigError(f"Invalid argument for optimizer {name!r}: {err}") from None
    log.info("%s", describe_groups(opt))
    return opt


def describe_groups(opt: torch.optim.Optimizer) -> str:
    """One line: how many tensors and parameters each group holds, and their weight decay."""
    parts = []
    for g in opt.param_groups:
        n = sum(p.numel() for p in g["params"])
        parts.append(
            f"{g.get('group', 'group')}: {len(g['params'])} tensors, {n:,} params, weight_decay={g['weight_decay']}"
        )
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
