"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for a model's weight matrices,
with AdamW for every other tensor in the same optimizer (Jordan et al. 2024; Liu et al. 2025).

Read top to bottom: the class (its groups, checks, state), the functional entry ``muon``,
then the backends, all with one signature (Note [backends] in _dispatch.py):
``_single_tensor_muon`` is the reference (one matrix at a time: the direction, then
``_newton_schulz``, then the step), ``_batched_muon`` orthogonalises every matrix of one
shape in a group in one chain of ``bmm``/``baddbmm``. Last, the backends for an 8-bit
momentum (Note [8-bit states] in _8bit.py): the same update between a decode and an encode,
on the CPU with its element-wise part in a C loop (``_MOMENTUM8BIT_KERNEL``).
Swapping backends changes speed, never results beyond rounding.

Decisions, and why
~~~~~~~~~~~~~~~~~~
* **One optimizer, two algorithms** (Note [several algorithms] in _base.py): a group says
  which algorithm updates it with ``use_muon``, as the published "Muon with auxiliary Adam"
  code marks its groups; the default is True, so a plain list of matrices is
  ``torch.optim.Muon``'s input. Groups with ``use_muon=False`` are updated by our AdamW's
  own backends (fused C on the CPU, Triton on CUDA) with AdamW's options, their missing
  ones taken from ``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``.
  Each group holds its own algorithm's options only; an option of the other algorithm in a
  group (``betas`` in a Muon group, ``momentum`` in an AdamW one) is refused (at the
  optimizer's own value it is the filling of torch's base class or of ZeroRedundancyOptimizer,
  and is dropped), as is a tensor
  of fewer than 2 dimensions in a Muon group: either is a split gone wrong, and the
  published code bases silently mis-route such tensors. ``factory.create_optimizer(model,
  "muon")`` splits a whole model (``factory.muon_labels``).
* **The update is torch.optim.Muon's**, operation for operation (``lerp`` for the momentum
  and the Nesterov direction, the norm clamped at ``eps`` rather than ``eps`` added, ``addmm``
  in the iteration, decay by ``1 - lr wd`` with the unscaled lr, then ``add_`` with
  ``alpha = -lr scale``): with ``ns_dtype=torch.bfloat16`` the reference equals it bit for
  bit on a CPU (tests/test_muon.py).
* **Matrices**: a 2-D tensor is one matrix; a 3-D tensor ``[E, out, in]`` is E matrices (a
  stack of experts); a tensor of 4 or more dimensions (a conv kernel ``[out, in, kh, kw]``),
  or any tensor of a group with ``flatten=True`` (a Conv1d kernel ``[out, in, k]``), is one
  matrix ``[out, in * kh * kw]``. ``split`` declares a fused weight (QKV, gate/up) as several
  matrices stacked along its rows, as ``torch.split(weight, split, dim=rows)`` cuts it: each
  is orthogonalised, and scaled, on its own.
* **ns_dtype**, the precision of the iteration: None chooses bfloat16 on GPUs (any device
  but the CPU, as the field does) and on CPUs with bf16 matrix instructions (AMX or AVX-512
  BF16, where bf16 matmuls run several times faster than float32 ones), float32 on other CPUs
  (where bf16 matmuls are emulated, and far slower), float64 for float64 parameters. The iteration's output is
  not orthogonal anyway (its singular values land in about [0.68, 1.2], tens of percent from
  ``U V^T``), and rounding it in bf16 moves it by about 1-2% (Frobenius): within that spread.
* **Precision** as everywhere here (Note [state precision]): bf16/fp16 parameters keep a
  float32 momentum and float32 element-wise math, rounded into the parameter once (to
  nearest, or stochastically: Note [stochastic rounding]); torch.optim.Muon keeps a bf16
  momentum for bf16 parameters. ``state_dtype=torch.uint8`` keeps the momentum in 8 bits.
* **Complex parameters** are refused (torch.optim.Muon refuses them: the iteration is
  written for real matrices).
* **FSDP2 shards** (DTensors sharded along their first dimension on a 1-D mesh): a rank holds
  rows of each matrix, and Newton-Schulz needs all of them. The element-wise equations run
  on each rank's rows; each whole direction is gathered on one owner rank (owners chosen so
  the ranks share the iterations' flops), orthogonalised there as in one process, and each rank gets its rows
  of O back: two collectives per group and step, and a step equal to the single process's
  (Note [Muon under FSDP2], at the end of the float backends). The momentum stays sharded
  like the parameter. Other layouts (tensor parallel: other placements, meshes of more than
  one dimension) are refused: their shards cut matrices along other dimensions, or several
  ways at once.
* **Backends**: the batched path is the fast one (``fused=True``, ``foreach=True`` and the
  default); ``foreach=False, fused=False`` takes the reference. Both trace under
  ``torch.compile`` without a graph break.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _8bit, _dispatch, _fused_cpu, _rounding
from ._base import Algorithm, Optimizer, Prepared
from ._checks import (
    check_backend,
    check_flag,
    check_lr,
    check_nonnegative,
    check_precision,
    check_unit_interval,
    plain,
)
from ._tensors import compute_dtype, host_value, is_dtensor, local
from .adamw import AdamW

__all__ = ["CPU_NS_DTYPE", "Muon", "muon"]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Jordan et al. (2024): steepest slope at 0, values near 1
NS_DTYPES = (None, torch.float64, torch.float32, torch.bfloat16, torch.float16)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16), from torch's
    own table of CPU features; False where torch cannot say."""
    try:
        features = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # (a private table: absent in other builds)
        return False
    return bool(features.get("amx_bf16") or features.get("avx512_bf16"))


# the CPU's default ns_dtype (see the module's decisions): read once, at import, so that a traced
# step reads a constant
CPU_NS_DTYPE = torch.bfloat16 if _fast_bf16_matmul() else torch.float32

# the options of each algorithm's groups (Note [several algorithms]); the shared ones go to both
_SHARED_KEYS = ("maximize", "foreach", "fused", "state_dtype", "stochastic_rounding", "seed", "min_8bit_size")
_MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn",
              "ns_dtype", "flatten", "split")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "correct_bias")
_ADAMW_DEFAULTS = {"lr": "adamw_lr", "betas": "adamw_betas", "eps": "adamw_eps", "weight_decay": "adamw_weight_decay"}
_ADAMW_ARGS = tuple(_ADAMW_DEFAULTS.values())  # the constructor's names of AdamW's defaults
_MUON_ONLY = tuple(k for k in _MUON_KEYS if k not in _ADAMW_KEYS)  # options an AdamW group has no use for
_MISSING = object()


def _same_option(value: Any, default: Any) -> bool:
    """``value`` is ``default``: the same plain value, a list for a tuple too (copies of groups may
    turn one into the other); a tensor is never taken for a default."""
    if isinstance(value, Tensor) or isinstance(default, Tensor) or default is _MISSING:
        return False
    if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)):
        return len(value) == len(default) and all(map(_same_option, value, default))
    return type(value) is type(default) and value == default


class Muon(Optimizer):
    r"""Muon for a model's weight matrices, AdamW for its other tensors, in one optimizer.

    .. code-block:: text

        input: lr (gamma), weight_decay (lambda), momentum (mu), nesterov,
               ns_coefficients (a, b, c), eps, ns_steps (k), adjust_lr_fn,
               params theta_0 (matrices: each 2-D tensor, each matrix of a 3-D stack,
               each flattened kernel; each block of a ``split``), objective f
        init:  m_0 = 0 (momentum_buffer)
        for each step:
            g     <- grad f(theta_{t-1})               (-grad if maximize)
            m_t   <- mu m_{t-1} + (1 - mu) g
            u     <- g + mu (m_t - g)  if nesterov  else  m_t
            O     <- NS(u)                             for each matrix (rows x cols) of u:
                     X <- u^T if rows > cols else u        (the short side first)
                     X <- X / max(||X||_F, eps)            (singular values <= 1)
                     repeat k times:
                         A <- X X^T
                         X <- a X + (b A + c A^2) X        (quintic Newton-Schulz)
                     O <- X^T if rows > cols else X
            theta <- theta_{t-1} (1 - gamma lambda)    # decoupled decay, unscaled lr
            theta_t <- theta - gamma s(rows, cols) O
                     s = sqrt(max(1, rows / cols))      "original" (and None)
                     s = 0.2 sqrt(max(rows, cols))      "match_rms_adamw"
        return theta_t

    NS approximates the orthogonal factor ``U V^T`` of ``u = U S V^T`` (the nearest
    semi-orthogonal matrix): the odd polynomial ``a x + b x^3 + c x^5`` is applied to every
    singular value at once. Its coefficients make the slope at 0 large (a = 3.4445), so that 5
    steps lift even small singular values (those of the normalised input above about 2e-3 land
    in [0.68, 1.2]; smaller ones are multiplied by up to a^5 = 485), at the price of leaving
    them near 1 rather than at 1 (Jordan et al. 2024, "Muon: An optimizer for hidden layers in
    neural networks", kellerjordan.github.io/posts/muon). ``"match_rms_adamw"`` scales the
    update to the RMS of AdamW's, 0.2, so that Muon shares AdamW's learning rate and weight
    decay (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982). With
    ``ns_dtype=torch.bfloat16`` this is ``torch.optim.Muon``, operation for operation.

    Groups with ``use_muon=False`` are :class:`~optimizer.AdamW` groups: its algorithm,
    options, state and backends, exactly (see that class). A plain list of tensors is one
    Muon group; a whole model: ``optimizer.factory.create_optimizer(model, "muon")``.

    Args:
        params: iterable of parameters (each of at least 2 dimensions) or of dicts defining
            parameter groups; ``use_muon`` (default True) says which algorithm a group uses.
        lr: learning rate of the Muon groups (float or one-element tensor), default 1e-3.
        weight_decay: decoupled weight decay of the Muon groups, default 0.1.
        momentum: mu, in [0, 1), default 0.95.
        nesterov: step along ``g + mu (m - g)`` (True, default) or along ``m``.
        ns_coefficients: (a, b, c) of the iteration, default (3.4445, -4.775, 2.0315).
        eps: the smallest norm the iteration's input is divided by, > 0, default 1e-7.
        ns_steps: iterations, in [0, 100), default 5.
        adjust_lr_fn: None (as "original"), "original" or "match_rms_adamw" (see above).
        ns_dtype: the dtype the iteration runs in: None (default; see the module's
            decisions), torch.bfloat16, torch.float16, torch.float32 or torch.float64.
        flatten: each tensor is one matrix, its first dimension by the product of the
            others (a Conv1d kernel); default False (a 3-D tensor is a stack of matrices).
        split: the rows of each matrix of a fused weight, as ``torch.split`` takes them
            along the rows (an int: the rows of each, dividing them; a list: each one's
            rows, adding up to them); default None (one matrix). Usually a group option.
        maximize: maximise the objective instead of minimising it (every group).
        foreach, fused: the backends of every group (see AdamW); for the Muon groups both,
            and the default, take the batched path; ``foreach=False, fused=False`` the
            reference.
        state_dtype: None (float32 for bf16/fp16 parameters, the parameter's dtype
            otherwise), torch.float32, torch.bfloat16, or torch.uint8 (8-bit: the Muon
            groups' momentum, AdamW's moments; Note [8-bit states]); every group.
        stochastic_rounding, seed: round bf16/fp16 parameters stochastically (see AdamW).
        min_8bit_size: smaller tensors keep float32 states with ``state_dtype=torch.uint8``.
        adamw_lr: lr of the AdamW groups that set none; default None: ``lr``.
        adamw_betas: their betas, default (0.9, 0.95) (the Muon papers' AdamW).
        adamw_eps: their eps, default 1e-8.
        adamw_weight_decay: their weight decay; default None: ``weight_decay``.

    State per parameter: in Muon groups ``momentum_buffer`` (``torch.optim.Muon``'s name; in
    ``state_dtype``; 8-bit states add ``momentum_buffer_scale``), in AdamW groups AdamW's.
    """

    name = "Muon (use_muon=True)"  # how an error message names this algorithm
    state_keys = ("momentum_buffer",)
    # every torch.optim.Muon checkpoint has these (so an SGD one, with a momentum_buffer too, is refused)
    checkpoint_keys = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps")
    backends: _dispatch.Backends  # set at the end of this file, once the backends are defined
    backends_8bit: _dispatch.Backends

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype | None = None,
        flatten: bool = False,
        split: int | Sequence[int] | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        min_8bit_size: int = _8bit.MIN_8BIT_SIZE,
        adamw_lr: float | Tensor | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
    ) -> None:
        defaults = dict(
            use_muon=True, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype, flatten=flatten, split=split, maximize=maximize, foreach=foreach, fused=fused,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, seed=seed,
            min_8bit_size=min_8bit_size,
            # None: the Muon groups' value (never `or`: a weight decay of 0 stays 0)
            adamw_lr=lr if adamw_lr is None else adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        )
        super().__init__(params, defaults)

    # ----- which algorithm, Note [several algorithms] ------------------------------

    # torch's Optimizer base fills a group with every option it lacks, and ZeroRedundancyOptimizer
    # fills its groups from its own keyword arguments and copies them into each rank's optimizer
    # before every step (momentum=0.95 lands in the AdamW groups too): the other algorithm's option
    # at this optimizer's own value is that filling, not a choice, and is dropped; another value is
    # still refused by the group's checks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            param_group = dict(param_group)
            self._drop_filled_options(param_group)
        super().add_param_group(param_group)

    def _prepare(self, gi: int, group: dict[str, Any]) -> Prepared:
        self._drop_filled_options(group)
        return super()._prepare(gi, group)

    def _drop_filled_options(self, group: dict[str, Any]) -> None:
        foreign = _ADAMW_ARGS if group.get("use_muon", self.defaults["use_muon"]) is True else _MUON_ONLY + _ADAMW_ARGS
        for key in [k for k in foreign if k in group and _same_option(group[k], self.defaults.get(k, _MISSING))]:
            del group[key]

    def _algorithm(self, group: dict[str, Any]) -> Algorithm:
        return self if group.get("use_muon", True) else _AUX_ADAMW

    def _group_defaults(self, group: dict[str, Any]) -> dict[str, Any]:
        d = self.defaults
        shared = {k: d[k] for k in _SHARED_KEYS}
        if group.get("use_muon", d["use_muon"]):
            return {"use_muon": True, **{k: d[k] for k in _MUON_KEYS}, **shared}
        adamw = {k: d[_ADAMW_DEFAULTS[k]] for k in _ADAMW_DEFAULTS}
        return {"use_muon": False, **adamw, "correct_bias": True, **shared}

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        self._check_group({k: defaults[k] for k in ("use_muon", *_MUON_KEYS, *_SHARED_KEYS)})
        # the AdamW groups' defaults, one at a time among valid ones, each named as the constructor's argument
        valid = {"use_muon": False, "lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0, "weight_decay": 0.0,
                 "correct_bias": True, **{k: defaults[k] for k in _SHARED_KEYS}}
        for key, name in _ADAMW_DEFAULTS.items():
            try:
                _AUX_ADAMW._check_group({**valid, key: defaults[name]})
            except (ValueError, TypeError) as err:
                raise type(err)(f"Invalid {name}: {str(err).removeprefix('Invalid ')}") from None

    # ----- what the Muon algorithm says ---------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        _refuse_options(group, ("betas", "correct_bias", *_ADAMW_DEFAULTS.values()), self.name,
                        "an AdamW option: set use_muon=False for an AdamW group")
        check_flag("use_muon", group["use_muon"])
        check_lr(group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_unit_interval("momentum", group["momentum"])
        check_flag("nesterov", group["nesterov"])
        _check_coefficients(group["ns_coefficients"])
        eps = group["eps"]
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < eps < math.inf):
            raise ValueError(f"Invalid eps: {eps!r} (a finite number > 0: the iteration divides by max(norm, eps))")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"Invalid ns_steps: {steps!r} (an int in [0, 100))")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r} (None, 'original' or "
                             "'match_rms_adamw')")
        if group["ns_dtype"] not in NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (None, torch.bfloat16, torch.float16, "
                             "torch.float32 or torch.float64)")
        check_flag("flatten", group["flatten"])
        _check_split(group["split"])
        check_flag("maximize", group["maximize"])
        check_backend(group)
        check_precision(group)
        if "params" in group:
            self._check_matrices(group)

    def _check_matrices(self, group: dict[str, Any]) -> None:
        """Every tensor of a Muon group is one or more real matrices that ``split`` cuts."""
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                continue  # (torch.optim's add_param_group names it)

            def where(i: int = i, p: Tensor = p) -> str:  # (only an error message needs it)
                return f"parameter {i} of group {self._group_index(group)} (shape {tuple(p.shape)})"

            if p.dim() < 2:
                raise ValueError(
                    f"Invalid params: {where()} has {p.dim()} dimension(s), and Muon updates matrices: put it in an "
                    "AdamW group ({'params': [...], 'use_muon': False}), or build the optimizer with "
                    "optimizer.factory.create_optimizer(model, 'muon'), which splits a model"
                )
            if p.is_complex():
                raise ValueError(f"Invalid params: {where()} is {p.dtype}: Muon updates real matrices (as "
                                 "torch.optim.Muon); put it in an AdamW group (use_muon=False)")
            _check_sharding(p, group["params"], where)
            _blocks(p.shape, group["flatten"], group["split"], where)

    def _group_index(self, group: dict[str, Any]) -> int:
        """The index of ``group`` (or of a copy with its ``params``); a group being added: the next."""
        return next((i for i, g in enumerate(self.param_groups) if g is group or g["params"] is group["params"]),
                    len(self.param_groups))

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return self._zero_states(param, group)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        split = group["split"]
        return dict(lr=plain(group["lr"]), weight_decay=plain(group["weight_decay"]),
                    momentum=plain(group["momentum"]), nesterov=group["nesterov"],
                    ns_coefficients=tuple(map(float, group["ns_coefficients"])), ns_steps=group["ns_steps"],
                    eps=float(group["eps"]), adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=group["ns_dtype"],
                    flatten=group["flatten"], split=split if split is None or isinstance(split, int) else tuple(split),
                    maximize=group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, float | None]:
        lr = group["lr"]
        lr = None if isinstance(lr, Tensor) and lr.device.type != "cpu" else float(lr)  # no sync to check it
        wd = group["weight_decay"]
        scale = max((scale_of(group["adjust_lr_fn"], rows, cols) for p in group["params"] if p.grad is not None
                     for _, _, rows, cols, _ in _blocks(p.shape, group["flatten"], group["split"])), default=1.0)
        return {"learning rate lr": lr, "weight_decay": wd, "lr * weight_decay": None if lr is None else lr * wd,
                "lr * scale": None if lr is None else lr * scale}


class _AuxAdamW(Algorithm):
    """The algorithm of a Muon optimizer's ``use_muon=False`` groups: :class:`~optimizer.AdamW`'s
    state, checks, hyper-parameters and backends, unchanged, so that these groups' results are
    AdamW's bit for bit (with stochastic rounding, those of an AdamW holding the tensors at the
    same places: a tensor's random bits follow its place in the optimizer, Note [stochastic
    rounding])."""

    name = "AdamW (use_muon=False)"
    state_keys = AdamW.state_keys
    counter_keys = AdamW.counter_keys
    nonnegative_keys = AdamW.nonnegative_keys
    checkpoint_keys = AdamW.checkpoint_keys
    backends = AdamW.backends
    backends_8bit = AdamW.backends_8bit
    _new_state = AdamW._new_state
    _hyper = AdamW._hyper
    _scalars = AdamW._scalars

    def _check_group(self, group: dict[str, Any]) -> None:
        muon_only = tuple(k for k in _MUON_KEYS if k not in _ADAMW_KEYS)
        _refuse_options(group, (*muon_only, *_ADAMW_DEFAULTS.values()), self.name,
                        "a Muon option: an AdamW group (use_muon=False) takes lr, betas, eps, weight_decay, "
                        "correct_bias")
        check_flag("use_muon", group["use_muon"])
        AdamW._check_group(self, group)  # type: ignore[arg-type]


_AUX_ADAMW = _AuxAdamW()


def _refuse_options(group: dict[str, Any], keys: Sequence[str], algorithm: str, why: str) -> None:
    for key in keys:
        if key in group:
            raise ValueError(f"Invalid option {key!r} in a group of {algorithm}: {why}")


def _check_coefficients(coefficients: Any) -> None:
    ok = isinstance(coefficients, (tuple, list)) and len(coefficients) == 3 and all(
        not isinstance(c, bool) and isinstance(c, numbers.Real) and math.isfinite(c) for c in coefficients)
    if not ok:
        raise ValueError(f"Invalid ns_coefficients: {coefficients!r} (three finite numbers (a, b, c))")


def _check_split(split: Any) -> None:
    if split is None:
        return
    sizes = [split] if isinstance(split, int) else split
    if not (isinstance(sizes, (list, tuple)) and sizes
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
        raise ValueError(f"Invalid split: {split!r} (None, the rows of each matrix as a positive int, or a list of "
                         "each matrix's rows)")


def _check_sharding(p: Tensor, params: Sequence[Any], where: Callable[[], str]) -> None:
    """A tensor of a Muon group is plain, or an FSDP2 shard (Note [Muon under FSDP2]) on the mesh of
    the group's other shards: a group's matrices are orthogonalised by one exchange between its ranks."""
    first = next((q for q in params if isinstance(q, Tensor)), p)
    if is_dtensor(p) != is_dtensor(first):
        kind = {True: "a DTensor", False: "a plain tensor"}
        raise ValueError(f"Invalid params: {where()} is {kind[is_dtensor(p)]}, the first of its group "
                         f"{kind[is_dtensor(first)]}: a Muon group holds FSDP2 shards only, or plain tensors only")
    if not is_dtensor(p):
        return
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(f"Invalid params: {where()} is a DTensor placed {placements} on a {mesh.ndim}-D mesh: Muon "
                         "gathers FSDP2 shards (Shard(0) on a 1-D mesh), not tensor-parallel ones; put it in an "
                         "AdamW group (use_muon=False)")
    if mesh != first.device_mesh:
        raise ValueError(f"Invalid params: {where()} is on device mesh {mesh}, the group's first tensor on "
                         f"{first.device_mesh}: a Muon group's shards are exchanged on one mesh")
    rows = _shard_rows(p.shape[0], mesh.size(), mesh.get_local_rank())[1]
    if p.to_local().shape[0] != rows:
        raise ValueError(f"Invalid params: {where()} holds {p.to_local().shape[0]} rows on mesh rank "
                         f"{mesh.get_local_rank()}, where FSDP2 (torch.chunk) puts {rows}: Muon gathers shards cut "
                         "as FSDP2 cuts them")


def _blocks(shape: Sequence[int], flatten: bool, split: int | Sequence[int] | None,
            where: Callable[[], str] = lambda: "the tensor") -> list[tuple[int, int, int, int, int]]:
    """The matrices of a tensor of ``shape``: one (row dimension, first row, rows, cols, count) per
    block of rows, ``count`` matrices of ``rows x cols`` each (the module's decisions). ``where()``
    names the tensor in the error a ``split`` that does not fit it raises."""
    stacked = len(shape) == 3 and not flatten
    row_dim = 1 if stacked else 0
    total, cols = shape[row_dim], math.prod(shape[row_dim + 1:])
    count = shape[0] if stacked else 1
    if split is None:
        sizes = [total]
    elif isinstance(split, int):
        if total % split:
            raise ValueError(f"Invalid split: {split} does not divide the {total} rows of {where()}")
        sizes = [split] * (total // split)
    else:
        if sum(split) != total:
            raise ValueError(f"Invalid split: {list(split)} adds up to {sum(split)} rows, {where()} has {total}")
        sizes = list(split)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(row_dim, start, rows, cols, count) for start, rows in zip(starts, sizes)]


def ns_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Flops of the iteration on one matrix of ``shape`` (rows x cols), counting its products only:
    with m <= n its sides (a tall matrix is transposed), each step computes A = X X^T (2 m^2 n),
    B = b A + c A^2 (2 m^3) and X' = a X + B X (2 m^2 n)."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def scale_of(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """The factor of the lr for a matrix of ``rows x cols`` (as torch.optim.Muon's ``_adjust_lr``)."""
    if rows == 0 or cols == 0:  # an empty matrix: nothing to scale
        return 1.0
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def ns_dtype_of(ns_dtype: torch.dtype | None, u: Tensor) -> torch.dtype:
    """The dtype the iteration runs in for the direction ``u`` (the module's decisions)."""
    if ns_dtype is not None:
        return ns_dtype
    if u.dtype == torch.float64:
        return torch.float64
    return CPU_NS_DTYPE if u.device.type == "cpu" else torch.bfloat16


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr_fn: str | None = None,
    ns_dtype: torch.dtype | None = None,
    flatten: bool = False,
    split: int | Sequence[int] | None = None,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """Functional Muon: updates ``params`` and ``momentum_buffers`` in place. See :class:`Muon`;
    ``foreach``/``fused`` choose the backend (Note [backends]); ``grad_scale``/``found_inf`` as
    torch.amp.GradScaler passes them (Note [GradScaler])."""
    for i, p in enumerate(params):  # before anything is written (the lists themselves: _dispatch)
        if isinstance(p, Tensor) and (p.dim() < 2 or p.is_complex()):
            raise ValueError(f"Invalid params[{i}]: {p.dtype} of shape {tuple(p.shape)} (Muon updates real "
                             "tensors of at least 2 dimensions)")
        if isinstance(p, Tensor):
            def where(i: int = i, p: Tensor = p) -> str:
                return f"params[{i}] (shape {tuple(p.shape)})"

            _check_sharding(p, params, where)
            _blocks(p.shape, flatten, split, where)
    hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                 ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
                 ns_dtype=ns_dtype, flatten=flatten, split=split, maximize=maximize)
    if rounding_seeds is not None:  # Note [stochastic rounding]: one 32-bit seed per tensor
        hyper["rounding_seeds"] = list(rounding_seeds)
    _dispatch.step(_BACKENDS, [params, grads, momentum_buffers], hyper, foreach=foreach, fused=fused,
                   grad_scale=grad_scale, found_inf=found_inf)


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_dtype: torch.dtype | None,
    flatten: bool,
    split: int | Sequence[int] | None,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """The reference: one tensor at a time, one matrix at a time."""
    if params and is_dtensor(params[0]):  # FSDP2 shards: Note [Muon under FSDP2]
        _sharded_muon(params, grads, momentum_buffers, batched=False, lr=lr, weight_decay=weight_decay,
                      momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
                      eps=eps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, flatten=flatten, split=split,
                      maximize=maximize, rounding_seeds=rounding_seeds)
        return
    lr = _traced_lr(host_value(lr))  # a number (a tensor under torch.compile)
    for i, (param, grad, buf) in enumerate(zip(params, grads, momentum_buffers)):
        # element-wise math in float32 or better (Note [state precision]); .to() is a no-op where no cast is needed
        dtype = compute_dtype(param.dtype, buf.dtype)
        p, m = param.to(dtype), buf.to(dtype)
        g = grad.to(dtype)
        if maximize:
            g = -g

        m.lerp_(g, 1 - momentum)                        # m_t = mu m + (1 - mu) g
        u = g.lerp(m, momentum) if nesterov else m      # u = g + mu (m_t - g), or m_t
        p.mul_(1 - lr * weight_decay)                   # theta <- theta (1 - lr wd)
        for row_dim, start, rows, cols, count in _blocks(param.shape, flatten, split):
            u_block, p_block = u.narrow(row_dim, start, rows), p.narrow(row_dim, start, rows)
            u_mats = u_block.reshape(count, rows, cols)
            for e in range(count):
                o = _newton_schulz(u_mats[e], ns_coefficients, ns_steps, eps, ns_dtype_of(ns_dtype, u))
                target = p_block[e] if count > 1 else p_block
                _step(target, o.reshape(target.shape), lr * scale_of(adjust_lr_fn, rows, cols))
        if m is not buf:                                # low precision: round the result once
            buf.copy_(m)
        if p is not param:                              # to nearest, or stochastically (Note [stochastic rounding])
            _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _traced_lr(lr: float | Tensor) -> float | Tensor:
    """Under torch.compile, a float lr as a tensor: as a Python number it would be baked into the
    ops' Scalar arguments (a stale lr, or a recompile, for each value a scheduler sets); as a tensor
    it stays an input of the graph. In eager mode, lr as it is."""
    if torch.compiler.is_compiling() and not isinstance(lr, Tensor):
        return torch.ones((), dtype=torch.float64) * lr
    return lr


def _newton_schulz(u: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                   dtype: torch.dtype) -> Tensor:
    """NS(u) of one matrix (the equations of :class:`Muon`), in ``dtype``: torch.optim.Muon's
    ``_zeropower_via_newtonschulz``, operation for operation."""
    a, b, c = coefficients
    x = u.to(dtype)
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T                                         # X = u^T: the short side first
    x = x / x.norm().clamp(min=eps)                     # X / max(||X||_F, eps)
    for _ in range(steps):
        A = x @ x.T                                     # A = X X^T
        B = torch.addmm(A, A, A, beta=b, alpha=c)       # B = b A + c A^2
        x = torch.addmm(x, B, x, beta=a)                # X = a X + B X
    return x.T if tall else x


def _step(p: Tensor, o: Tensor, lr_scaled: float | Tensor) -> None:
    """theta <- theta - lr s O, as torch.optim.Muon writes it (``add_`` with ``alpha``)."""
    if isinstance(lr_scaled, Tensor):  # under torch.compile: no tensor alpha in add_; O widened first
        p.sub_(o.to(p.dtype) * lr_scaled)
    else:
        p.add_(o, alpha=-lr_scaled)


def _batched_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_dtype: torch.dtype | None,
    flatten: bool,
    split: int | Sequence[int] | None,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
    directions: list[Tensor] | None = None,
) -> None:
    """The same update, each element-wise equation one foreach call for the group, and the
    matrices of one shape (and device, and iteration dtype) orthogonalised together: one chain
    of ``bmm``/``baddbmm`` (:func:`_batched_newton_schulz`) per shape. ``directions``: the
    directions u, computed already with the momentum (the 8-bit C loop); the momentum buffers
    are then left alone."""
    if params and is_dtensor(params[0]):  # FSDP2 shards: Note [Muon under FSDP2]
        _sharded_muon(params, grads, momentum_buffers, batched=True, lr=lr, weight_decay=weight_decay,
                      momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
                      eps=eps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, flatten=flatten, split=split,
                      maximize=maximize, rounding_seeds=rounding_seeds)
        return
    lr = _traced_lr(host_value(lr))  # a number (a tensor under torch.compile)
    if directions is None:
        dtypes = [compute_dtype(p.dtype, m.dtype) for p, m in zip(params, momentum_buffers)]
        ps = [p.to(d) for p, d in zip(params, dtypes)]
        ms = [m.to(d) for m, d in zip(momentum_buffers, dtypes)]
        gs = [g.to(d) for g, d in zip(grads, dtypes)]
        if maximize:
            gs = torch._foreach_neg(gs)

        torch._foreach_lerp_(ms, gs, 1 - momentum)                      # m_t = mu m + (1 - mu) g
        us = torch._foreach_lerp(gs, ms, momentum) if nesterov else ms  # u = g + mu (m_t - g), or m_t
    else:
        ps = [p.to(compute_dtype(p.dtype, u.dtype)) for p, u in zip(params, directions)]
        ms, us = momentum_buffers, directions
    if weight_decay != 0:  # (a product by 1 is exact: the reference, which multiplies, is the same)
        torch._foreach_mul_(ps, _decay(lr, weight_decay, ps))       # theta <- theta (1 - lr wd)

    # the matrices by shape (their u's, and the blocks of theta they update), each shape's in one chain
    for (rows, cols, dtype, _), (sources, targets) in _batches(us, ps, flatten, split, ns_dtype).items():
        updates = _orthogonalised_batch(sources, targets, ns_coefficients, ns_steps, eps, dtype)
        lr_scaled = lr * scale_of(adjust_lr_fn, rows, cols)
        if isinstance(lr_scaled, Tensor):  # (under torch.compile: no tensor alpha)
            torch._foreach_sub_(targets, torch._foreach_mul([x.to(t.dtype) for x, t in zip(updates, targets)],
                                                            lr_scaled))
        else:
            torch._foreach_add_(targets, updates, alpha=-lr_scaled)  # theta <- theta - lr s O

    for i, (param, p, buf, m) in enumerate(zip(params, ps, momentum_buffers, ms)):
        if m is not buf:                                           # low precision: round the result once
            buf.copy_(m)
        if p is not param:                                         # (Note [stochastic rounding])
            _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _decay(lr: float | Tensor, weight_decay: float, ps: list[Tensor]) -> float | Tensor:
    """1 - lr wd, for ``_foreach_mul_``: a tensor lr moved to the parameters' device (no sync), in its
    own dtype (a 0-dim tensor does not widen the product: each parameter multiplies in its dtype)."""
    if isinstance(lr, Tensor):
        return (1 - lr * weight_decay).to(ps[0].device) if ps else lr
    return 1 - lr * weight_decay


def _batches(us: list[Tensor], targets: list[Tensor], flatten: bool, split: int | Sequence[int] | None,
             ns_dtype: torch.dtype | None) -> dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]]:
    """The matrices of the directions ``us`` by (rows, cols, iteration dtype, device): for each, the
    blocks of u (count x rows x cols) and the same blocks of the tensor of ``targets`` beside it."""
    batches: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
    for u, target in zip(us, targets):
        for row_dim, start, rows, cols, count in _blocks(u.shape, flatten, split):
            key = (rows, cols, ns_dtype_of(ns_dtype, u), u.device)
            sources, blocks = batches.setdefault(key, ([], []))
            sources.append(u.narrow(row_dim, start, rows).reshape(count, rows, cols))
            blocks.append(target.narrow(row_dim, start, rows))
    return batches


def _orthogonalised_batch(sources: list[Tensor], targets: list[Tensor], coefficients: tuple[float, float, float],
                          steps: int, eps: float, dtype: torch.dtype) -> list[Tensor]:
    """NS of one batch of :func:`_batches` in one chain of products: each source's O, shaped like its target."""
    o = _batched_newton_schulz(torch.cat(sources) if len(sources) > 1 else sources[0], coefficients, steps, eps,
                               dtype)
    return [o_t.reshape(t.shape) for o_t, t in zip(o.split([s.shape[0] for s in sources]), targets)]


def _batched_newton_schulz(u: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                           dtype: torch.dtype) -> Tensor:
    """NS of each matrix of ``u`` (N, rows, cols), as :func:`_newton_schulz`, in one chain of batched products."""
    a, b, c = coefficients
    x = u.to(dtype)
    tall = u.size(-2) > u.size(-1)
    if tall:
        x = x.mT                                                   # X = u^T: the short side first
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)     # X / max(||X||_F, eps), each matrix
    for _ in range(steps):
        A = torch.bmm(x, x.mT)                                     # A = X X^T
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)                # B = b A + c A^2
        x = torch.baddbmm(x, B, x, beta=a)                         # X = a X + B X
    return x.mT if tall else x


# ----- FSDP2 shards ---------------------------------------------------------------------
# Note [Muon under FSDP2]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Under FSDP2 each parameter is a DTensor sharded along its first dimension on a 1-D mesh:
# a rank holds rows [start, start + n) of it, as torch.chunk cuts them (``_shard_rows``: the
# shards may be uneven, the last ones empty); its gradient and its momentum are sharded the
# same way (8-bit codes and their scales too: a block never crosses a row). The momentum,
# the direction u, the decay and the final step are element-wise, so each rank computes them
# on its rows, as one process computes them. Newton-Schulz needs whole matrices:
#   * a stack of experts (3-D, ``flatten`` off) is sharded by experts, so each rank holds
#     whole matrices: it orthogonalises its own, and nothing crosses the network;
#   * every other tensor (a matrix, a ``split`` fused weight, a flattened kernel) has an
#     owner, a rank of the mesh's group chosen from the shapes, which every rank sees alike,
#     so the ranks share the iterations' flops (``_owners``: largest first, each to the
#     least loaded rank). One
#     ``all_to_all_single`` sends each owner every rank's rows of its directions, in the
#     widest dtype among them (exactly); the owner orthogonalises its whole directions and
#     the stacks' local matrices, as the backend does in one process (one matrix at a time,
#     or batched by shape), and a second ``all_to_all_single`` sends each rank its rows of
#     O. Each element of u and of O crosses the network once.
# So two collectives per Muon group and step (per part of a group: its 8-bit and float
# tensors are two), none for a group of stacks only; each rank waits for the slowest owner.
# Every rank must step the same parameters (FSDP2 gives each one a gradient on every rank).
# The result equals the single process's bit for bit where the matrix products of one
# matrix do not depend on the others of its batch (as on the CPU; tests/test_distributed.py).


def _sharded_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    batched: bool,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_dtype: torch.dtype | None,
    flatten: bool,
    split: int | Sequence[int] | None,
    maximize: bool,
    rounding_seeds: Sequence[int] | None = None,
) -> None:
    """Both backends on FSDP2 shards (Note [Muon under FSDP2]): the element-wise equations of
    :func:`_batched_muon` on this rank's rows, the matrices orthogonalised whole by
    :func:`_gather_orthogonalise_scatter` (one at a time as the reference, or by shape with
    ``batched``), then this rank's rows of each ``theta - lr s O``."""
    lr = host_value(lr)
    params_here, bufs = [local(p) for p in params], [local(m) for m in momentum_buffers]
    dtypes = [compute_dtype(p.dtype, m.dtype) for p, m in zip(params_here, bufs)]
    ps = [p.to(d) for p, d in zip(params_here, dtypes)]
    ms = [m.to(d) for m, d in zip(bufs, dtypes)]
    gs = [local(g).to(d) for g, d in zip(grads, dtypes)]
    if maximize:
        gs = torch._foreach_neg(gs)

    torch._foreach_lerp_(ms, gs, 1 - momentum)                      # m_t = mu m + (1 - mu) g
    us = torch._foreach_lerp(gs, ms, momentum) if nesterov else ms  # u = g + mu (m_t - g), or m_t
    if weight_decay != 0:
        torch._foreach_mul_(ps, _decay(lr, weight_decay, ps))       # theta <- theta (1 - lr wd)

    def orthogonalise(whole: list[Tensor]) -> list[Tensor]:
        return _orthogonalised(whole, batched=batched, coefficients=ns_coefficients, steps=ns_steps, eps=eps,
                               ns_dtype=ns_dtype, flatten=flatten, split=split)

    os = _gather_orthogonalise_scatter(params, us, [ns_dtype_of(ns_dtype, u) for u in us], flatten, split,
                                       orthogonalise)
    # theta <- theta - lr s O on this rank's rows of each block (s: the block's, from its whole shape)
    by_scale: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for param, p, o in zip(params, ps, os):
        mesh = param.device_mesh
        first = _shard_rows(param.shape[0], mesh.size(), mesh.get_local_rank())[0]
        for row_dim, start, rows, cols, _ in _blocks(param.shape, flatten, split):
            here = rows                 # a stack of experts: the block of each expert this rank holds
            if row_dim == 0:            # a block of rows: those of this rank's shard
                lo, hi = max(start, first), min(start + rows, first + p.shape[0])
                start, here = lo - first, hi - lo
            if here > 0:
                targets, updates = by_scale.setdefault(scale_of(adjust_lr_fn, rows, cols), ([], []))
                targets.append(p.narrow(row_dim, start, here))
                updates.append(o.narrow(row_dim, start, here))
    for scale, (targets, updates) in by_scale.items():
        if batched:
            torch._foreach_add_(targets, updates, alpha=-(lr * scale))
        else:
            for target, update in zip(targets, updates):
                _step(target, update, lr * scale)

    for i, (param, p, buf, m) in enumerate(zip(params_here, ps, bufs, ms)):
        if m is not buf:
            buf.copy_(m)
        if p is not param:  # (stochastically: the bits follow the element's index in this shard)
            _rounding.store_param(param, p, None if rounding_seeds is None else rounding_seeds[i])


def _shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of mesh rank ``rank``'s shard of ``rows`` rows, as FSDP2 cuts them
    (``torch.chunk``: ceil(rows / world) each, the last shards shorter or empty)."""
    each = -(-rows // world)
    first = min(rows, rank * each)
    return first, min(rows, first + each) - first


def _orthogonalised(us: list[Tensor], *, batched: bool, coefficients: tuple[float, float, float], steps: int,
                    eps: float, ns_dtype: torch.dtype | None, flatten: bool,
                    split: int | Sequence[int] | None) -> list[Tensor]:
    """O = NS(u) of each direction (whole matrices), shaped like it, in the iteration's dtype: one
    matrix at a time (as :func:`_single_tensor_muon`), or those of one shape in one chain of
    batched products (as :func:`_batched_muon`)."""
    os = [torch.empty(u.shape, dtype=ns_dtype_of(ns_dtype, u), device=u.device) for u in us]
    for (_, _, dtype, _), (sources, targets) in _batches(us, os, flatten, split, ns_dtype).items():
        if batched:
            for o, target in zip(_orthogonalised_batch(sources, targets, coefficients, steps, eps, dtype), targets):
                target.copy_(o)
        else:
            for source, target in zip(sources, targets):
                for e in range(source.shape[0]):
                    target.view(source.shape)[e].copy_(_newton_schulz(source[e], coefficients, steps, eps, dtype))
    return os


def _gather_orthogonalise_scatter(params: list[Tensor], us: list[Tensor], o_dtypes: list[torch.dtype],
                                  flatten: bool, split: int | Sequence[int] | None,
                                  orthogonalise: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """This rank's rows of ``orthogonalise`` of each whole direction (each parameter's rows of O,
    in ``o_dtypes``), from this rank's rows ``us`` of the directions of the FSDP2 ``params``: the
    collective part of Note [Muon under FSDP2]. Stacks of experts stay here; every other tensor
    goes to its owner (:func:`_owners`: the work shared by flops) and back, in two ``all_to_all_single``."""
    import torch.distributed as dist

    mesh = params[0].device_mesh
    group = mesh.get_group()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    order = mesh.mesh.flatten().tolist()
    shard = [order.index(dist.get_global_rank(group, r)) for r in range(world)]  # each group rank's place in the mesh
    here = [i for i, p in enumerate(params) if p.dim() == 3 and not flatten]     # stacks: whole matrices here
    moved = [i for i, p in enumerate(params) if not (p.dim() == 3 and not flatten)]
    if not moved:  # stacks only: nothing to exchange
        return orthogonalise(us)
    owned = [[moved[k] for k in ks] for ks in _owners([_work(params[i].shape, flatten, split) for i in moved], world)]
    mine = owned[me]

    def size(i: int, r: int) -> int:  # elements of parameter i on group rank r
        return _shard_rows(params[i].shape[0], world, shard[r])[1] * math.prod(params[i].shape[1:])

    # 1. every rank's rows of each direction to its owner, who stacks them (in mesh order) into the whole u
    sent = [sum(size(i, me) for i in owned[r]) for r in range(world)]
    received = [sum(size(i, r) for i in mine) for r in range(world)]
    wire = functools.reduce(torch.promote_types, [us[i].dtype for i in moved])  # holds each exactly
    recv = _all_to_all([us[i] for r in range(world) for i in owned[r]], sent, received, wire, us[0].device, group)
    pieces = [chunk.split([size(i, r) for i in mine]) for r, chunk in enumerate(recv.split(received))]
    ranks_in_mesh_order = sorted(range(world), key=shard.__getitem__)
    whole = [torch.cat([pieces[r][k].view(-1, *params[i].shape[1:]) for r in ranks_in_mesh_order]).to(us[i].dtype)
             for k, i in enumerate(mine)]

    # 2. orthogonalise: the whole directions this rank owns and its own experts, together (batched by shape)
    done = orthogonalise(whole + [us[i] for i in here])
    os: list[Tensor | None] = [None] * len(params)
    for i, o in zip(here, done[len(mine):]):
        os[i] = o

    # 3. each rank its rows of O
    def rows_of(o: Tensor, i: int, r: int) -> Tensor:
        return o.narrow(0, *_shard_rows(params[i].shape[0], world, shard[r]))

    wire = functools.reduce(torch.promote_types, [o_dtypes[i] for i in moved])
    recv = _all_to_all([rows_of(o, i, r) for r in range(world) for o, i in zip(done, mine)], received, sent, wire,
                       us[0].device, group)
    for r, chunk in enumerate(recv.split(sent)):
        for i, piece in zip(owned[r], chunk.split([size(i, me) for i in owned[r]])):
            os[i] = piece.view(us[i].shape).to(o_dtypes[i])
    return os  # type: ignore[return-value]


def _work(shape: Sequence[int], flatten: bool, split: int | Sequence[int] | None) -> int:
    """The iteration's flops for a tensor of ``shape``: those of each of its matrices (``_blocks``)."""
    return sum(count * ns_flops((rows, cols)) for _, _, rows, cols, count in _blocks(shape, flatten, split))


def _owners(work: Sequence[int], world: int) -> list[list[int]]:
    """Which rank orthogonalises which tensor, from each tensor's ``work`` (its iteration's flops):
    the largest first, each to the rank with the least work so far (the lowest such rank on a tie),
    so the ranks wait for the slowest owner as little as this greedy rule allows. Every rank
    computes the same lists from the same shapes. Returns each rank's tensor indices, ascending."""
    load, owned = [0] * world, [[] for _ in range(world)]
    for k in sorted(range(len(work)), key=lambda k: (-work[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += work[k]
        owned[r].append(k)
    return [sorted(ks) for ks in owned]


def _all_to_all(chunks: list[Tensor], sent: list[int], received: list[int], dtype: torch.dtype,
                device: torch.device, group: Any) -> Tensor:
    """``chunks`` (flattened, in ``dtype``), ``sent[r]`` elements of them to rank r of ``group``;
    returns what arrives, ``received[r]`` elements from rank r, in rank order."""
    import torch.distributed as dist

    send = torch.cat([c.reshape(-1).to(dtype) for c in chunks]) if chunks else torch.empty(0, dtype=dtype,
                                                                                            device=device)
    recv = torch.empty(sum(received), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, received, sent, group=group)
    return recv


_BACKENDS = _dispatch.Backends(
    names=("params", "grads", "momentum_buffers"),
    reference=_single_tensor_muon,
    foreach=_batched_muon,
    n_states=1,
    rounding=frozenset({"reference", "foreach"}),  # Note [stochastic rounding]
)
Muon.backends = _BACKENDS

# ----- 8-bit momentum (Note [8-bit states] in _8bit.py) --------------------------------------
# The same update between a decode and an encode of the momentum: each step decodes it into
# float32, runs the float update on it and encodes it again (rounded to nearest, as AdamW's
# and Lion's first moments). Under FSDP2 codes and scales are sharded by rows as the parameter,
# and a block never crosses a row: each rank decodes and encodes its own rows (``local``), and
# the float update gets them as plain tensors next to the DTensor parameters (Note [Muon under
# FSDP2]).


def _decoded(momentum_buffers: list[Tensor], scales: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    return [_8bit.decode_signed(local(codes).view(torch.int8).reshape(_8bit.rows_cols(local(p).shape)),
                                local(scale)).reshape(local(p).shape)
            for codes, scale, p in zip(momentum_buffers, scales, params)]


def _encode(ms: list[Tensor], momentum_buffers: list[Tensor], scales: list[Tensor]) -> None:
    for m, codes, scale in zip(ms, momentum_buffers, scales):
        new_codes, new_scale = _8bit.encode_signed(m.reshape(_8bit.rows_cols(m.shape)))
        local(codes).view(torch.int8).copy_(new_codes.reshape(m.shape))
        local(scale).copy_(new_scale)


def _single_tensor_muon8bit(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                            momentum_buffer_scales: list[Tensor], **hyper: Any) -> None:
    """The reference with an 8-bit momentum."""
    ms = _decoded(momentum_buffers, momentum_buffer_scales, params)
    _single_tensor_muon(params, grads, ms, **hyper)
    _encode(ms, momentum_buffers, momentum_buffer_scales)


def _batched_muon8bit(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                      momentum_buffer_scales: list[Tensor], **hyper: Any) -> None:
    """The batched path with an 8-bit momentum."""
    ms = _decoded(momentum_buffers, momentum_buffer_scales, params)
    _batched_muon(params, grads, ms, **hyper)
    _encode(ms, momentum_buffers, momentum_buffer_scales)


# The C loop (Note [fused CPU] in _fused_cpu.py, csrc/8bit_loop.c) for the element-wise part: a
# block of 256 values of a row at a time, the momentum decoded into m, updated, the direction
# written in float32 where the loop writes a parameter, and m encoded again: one pass over the
# codes instead of the decode's and the encode's many. The iteration and the step then run as
# the batched path's. The same operations as the reference, in the same order (LERP is torch's
# lerp); a value on a code's rounding boundary may take the neighbouring code (as Lion8bit's).
_MOMENTUM8BIT_KERNEL = _fused_cpu.Kernel(
    name="muon_momentum8bit",
    states=("m",),
    scalars=("w", "mu", "nesterov"),
    codes=("signed",),
    body="""
        m = LERP(m, g, w);                      /* m_t = mu m + (1 - mu) g, with w = 1 - mu */
        p = nesterov != 0 ? LERP(g, m, mu) : m; /* u = g + mu (m_t - g), or m_t: into the direction */
    """,
)


def _fused_c_muon8bit(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                      momentum_buffer_scales: list[Tensor], **hyper: Any) -> None:
    """The C loop for the momentum and the direction (float32, whatever the parameter's dtype),
    then the batched path's iteration and step; FSDP2 shards take the batched path."""
    if is_dtensor(params[0]):
        _batched_muon8bit(params, grads, momentum_buffers, momentum_buffer_scales, **hyper)
        return
    grads32 = [g.float() for g in grads]  # (the loop's direction and gradient share one dtype)
    us = [torch.empty_like(g) for g in grads32]
    mu = hyper["momentum"]
    _fused_cpu.run(_MOMENTUM8BIT_KERNEL, us, grads32, [momentum_buffers, momentum_buffer_scales],
                   [1 - mu, mu, float(hyper["nesterov"])], maximize=hyper["maximize"])
    _batched_muon(params, grads, momentum_buffers, **hyper, directions=us)


_BACKENDS_8BIT = _dispatch.Backends(
    names=("params", "grads", "momentum_buffers", "momentum_buffer_scales"),
    reference=_single_tensor_muon8bit,
    foreach=_batched_muon8bit,
    c=_fused_c_muon8bit,
    c_kernel=_MOMENTUM8BIT_KERNEL,
    n_states=2,
    eight_bit=True,
    rounding=frozenset({"reference", "foreach", "c"}),
)
Muon.backends_8bit = _BACKENDS_8BIT
