"""SparseAdamW: AdamW for sparse gradients, touching only the rows that learned.

For embedding tables trained with sparse gradients (``nn.Embedding(sparse=True)``,
``nn.EmbeddingBag(sparse=True)``, recommendation models, large vocabularies): the moments
are lazy, as ``torch.optim.SparseAdam``'s (only the rows in the gradient move), and the
decoupled weight decay is lazy but exact: a row pays, when it is next touched, the product
of the factors ``1 - lr_s * wd`` of every step it missed (Note [lazy decay]). A step reads
and writes the touched rows only: no temporary of the table's size. Parameters with dense
gradients in the same optimizer are updated by AdamW's own backends, exactly as
:class:`optimizer.AdamW` updates them, so one optimizer serves a mixed model.

Read top to bottom: the class, the functional entry ``sparse_adamw``, then the backends,
all with one signature (Note [backends] in _dispatch.py): ``_single_tensor_sparse_adamw``
is the reference (plain torch over the gradient's rows: ``index_select``, the update,
``index_copy_``), ``_fused_c_sparse_adamw`` the C loop over the touched rows
(csrc/sparse_rows.c around AdamW's own C body), and ``sparse_adamw`` in _sparse_triton.py
the Triton kernel. Swapping backends changes speed, never results beyond rounding.

Decisions, and why
~~~~~~~~~~~~~~~~~~
* **The update of a touched row is AdamW's**, operation for operation (decay first, then
  the moments, then the step, eps added to the bias-corrected root: Note [eps placement]
  in adamw.py). So with every row touched at every step the result *is* our AdamW's: the
  tests find it bit for bit equal to ``AdamW``'s reference and C loop.
* **torch.optim.SparseAdam** places eps as the Adam paper's "more efficient" ordering
  does, on the uncorrected root: ``p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.
  Ours is that update with ``eps * sqrt(1 - b2^t)`` for eps. With ``weight_decay=0`` the two are the
  same algorithm (lazy moments, the same step counts) but for that eps: the tests compare
  with SparseAdam run with ``eps * sqrt(1 - b2^t)`` set at each step (and with ``eps=0``
  as it is) to float32 rounding, not bit for bit: SparseAdam rounds other operations
  (``m + (1 - b1)(g - m)`` where AdamW's ``lerp`` has one fused multiply-add, its step
  size folded differently).
* **Lazy moments as SparseAdam's**: the rows of the gradient, duplicate indices summed, are
  updated, the others keep their moments and weights; the step count ``t`` of the bias
  corrections is the parameter's, +1 at every step it has a gradient, even an empty one
  (SparseAdam counts so too). A gradient is coalesced only if its rows repeat: the
  backends need distinct rows, not sorted ones, and coalescing copies every value (on a
  wide table, a large share of a step; checking that the rows are distinct costs far
  less); the results are the same, bit for bit.
* **Lazy decay, exact** (Note [lazy decay]): per parameter a float64 running log
  ``decay_log`` of the product of ``1 - lr_s * wd`` over its steps, per row a float64
  ``row_decay_log``, the value of that log when the row last paid. The factors are those
  actually used, so a scheduler changing ``lr`` (or ``weight_decay``) between steps is
  honoured exactly. 8 bytes per row: 2 MB for a 256k-row table whose moments take 2 GB.
* **Rows** are along dim 0: a table's rows, a 1-D parameter's elements. Gradients must be
  row-sparse COO tensors (``sparse_dim() == 1``, what Embedding and EmbeddingBag give);
  element-sparse ones (``sparse_dim() > 1``) and other layouts are refused with an error.
* **Weights are decayed before they are read**: ``state_dict()`` pays every row's debt
  first (so weights saved in the same checkpoint are the decayed ones, and the saved
  state is AdamW's, ``step``/``exp_avg``/``exp_avg_sq``: it loads into ``AdamW`` and
  ``torch.optim.AdamW``, and SparseAdam's checkpoints load here); ``flush()`` does it on
  demand, ``flush(param, rows)`` for some rows (e.g. the rows a batch is about to read).
  It pays in place, so ``model.state_dict()`` taken in the same ``torch.save`` sees it;
  weights *copied* before ``opt.state_dict()`` (or ``flush()``) would miss it.
  Between steps a row untouched for ``k`` steps is read stale by its decay, of relative size
  ``k * lr * wd``; that is what lazy decay is (the next touch pays it exactly).
* **Checkpoints**: save, load and save again give the same dict; a resumed run equals,
  bit for bit, an uninterrupted run that saved at the same step (``state_dict()`` pays the
  debt, in one rounding where the row would otherwise pay it later in another).
* **A parameter may switch** between sparse and dense gradients: a dense step first pays
  its debt, then is AdamW's.
* ``lr * weight_decay < 1`` is required (the log of a factor <= 0 does not exist; such a
  factor would zero or flip the weights).
* **Backends**: ``fused`` (the default) takes the C loop on the CPU and the Triton kernel
  on CUDA for contiguous parameters; the reference elsewhere and with ``fused=False``.
  There is no multi-tensor form (each tensor has its own rows): with ``foreach=True`` the
  sparse parameters take the reference and the dense ones AdamW's foreach path.
* **Host reads**: coalescing a gradient reads its size on the host (a sync on CUDA), so the
  sparse path reads the lr, step counts, decay logs and GradScaler's ``found_inf`` there
  too, and the step runs outside a ``torch.compile`` graph (one graph break).
* **Precision** as everywhere here (Note [state precision]): bf16/fp16 parameters keep
  float32 moments and float32 math; the decay factor is formed in float64 and rounded once.
  No ``state_dtype``, 8-bit states or stochastic rounding options; complex parameters are
  refused on the sparse path (SparseAdam refuses them too) and taken on the dense one.

Note [lazy decay]
~~~~~~~~~~~~~~~~~
Dense AdamW multiplies every row by ``1 - lr_s * wd`` at every step ``s``. A row touched at
step ``t`` and last at step ``u < t`` owes ``prod_{s=u+1..t} (1 - lr_s * wd)``. Each
parameter keeps ``L = sum_s ln(1 - lr_s * wd)`` over its steps (``decay_log``) and each
row the ``L`` at which it last paid (``row_decay_log``). At step ``t`` a touched row pays
``exp(L_{t-1} - l[i]) * (1 - lr_t * wd)``, formed in float64 and rounded once to the
math's precision, and gets ``l[i] = L_t``: a row touched at every step pays
``exp(0) * (1 - lr_t wd) = 1 - lr_t wd`` exactly, AdamW's own number. The float64 log
carries a relative error of about ``1e-16 * |L|``, far below float32 rounding. ``L`` moves
in one place, :func:`_apply`, after the backends ran (they read ``L_{t-1}``), by the same
``ln(1 - lr_t wd)`` the backends added for the touched rows (``_logs``). Paying everything
(``flush()``, ``state_dict()``) multiplies each row by ``exp(L - l[i])`` (exactly 1 for a
row that owes nothing) and drops both keys: nothing owed is no bookkeeping, and the state is
AdamW's again until the next sparse step.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import _dispatch, _fused_cpu
from ._base import Optimizer, Part, Prepared
from ._checks import (
    check_backend,
    check_betas,
    check_fits,
    check_flag,
    check_lr,
    check_nonnegative,
    check_torch_adamw_options,
)
from ._tensors import Meta, compute_dtype, device_types, host_value, pick, state_dtype
from .adamw import AdamW, bias_corrections

__all__ = ["SparseAdamW", "sparse_adamw"]

# the lazy decay's bookkeeping (Note [lazy decay]), kept only while some row owes decay
LAZY_KEYS = ("decay_log", "row_decay_log")
_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SparseAdamW(Optimizer):
    r"""AdamW for sparse gradients: lazy moments, exact lazy decoupled weight decay.

    .. code-block:: text

        input: lr (gamma_t, may change between steps), betas (beta1, beta2), eps,
               weight_decay (lambda), correct_bias, maximize, params theta (rows theta[i])
        init:  m = 0 (exp_avg), v = 0 (exp_avg_sq), t = 0 (step),
               L = 0 (decay_log), l[i] = 0 (row_decay_log)
        for each step with a sparse gradient g of rows R (duplicates summed; -g if maximize):
            t <- t + 1
            for each row i in R:
                theta[i] <- theta[i] * exp(L - l[i]) * (1 - gamma_t lambda)   # all it owes
                m[i] <- beta1 m[i] + (1 - beta1) g[i]
                v[i] <- beta2 v[i] + (1 - beta2) g[i]^2
                m_hat <- m[i] / (1 - beta1^t) ;  v_hat <- v[i] / (1 - beta2^t)   (correct_bias)
                theta[i] <- theta[i] - gamma_t m_hat / (sqrt(v_hat) + eps)
                l[i] <- L + ln(1 - gamma_t lambda)
            L <- L + ln(1 - gamma_t lambda)
        flush (state_dict(), flush()): theta[i] <- theta[i] * exp(L - l[i]) for every row
        for each step with a dense gradient: flush, then AdamW's step (:class:`AdamW`)

    Rows absent from the gradient keep their moments and weights, as in
    ``torch.optim.SparseAdam``; their decay is owed, and paid exactly when they are next
    touched or flushed. With every row touched at every step this is :class:`AdamW`; with
    ``weight_decay=0`` it is ``torch.optim.SparseAdam`` but for where eps goes (see the
    module's decisions; Note [eps placement] in adamw.py).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or a one-element tensor), default 1e-3.
        betas: coefficients of the running averages of the gradient and its square,
            default (0.9, 0.999); each in [0, 1).
        eps: added to the denominator for numerical stability, default 1e-8.
        weight_decay: decoupled weight decay coefficient, default 1e-2;
            ``lr * weight_decay`` must stay below 1.
        correct_bias: divide the moments by ``1 - beta^t`` (default True).
        maximize: maximise the objective instead of minimising it.
        foreach: dense gradients take AdamW's multi-tensor path (True) or not (False);
            sparse ones have no multi-tensor form and take the reference.
        fused: use the fused kernels (True) or not (False): the C loop on the CPU,
            Triton on CUDA, for both kinds of gradient. With both None (default): fused.

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg``, ``exp_avg_sq``
    (AdamW's), and while some row owes decay ``decay_log`` (a float64 scalar on the CPU)
    and ``row_decay_log`` (float64, one per row, on the parameter's device).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    counter_keys = ("step",)
    nonnegative_keys = AdamW.nonnegative_keys
    # torch.optim.SparseAdam's checkpoints have no weight_decay: the default fills it
    checkpoint_keys = ("lr", "betas", "eps")
    backends = AdamW.backends  # dense gradients: AdamW's backends (Note [backends])

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
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_torch_adamw_options(amsgrad, capturable, differentiable)  # (AdamW's keywords: create_optimizer)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        maximize=maximize, foreach=foreach, fused=fused)
        self._may_owe = False  # some parameter has kept lazy decay bookkeeping (Note [lazy decay])
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_flag("correct_bias", group["correct_bias"])
        check_flag("maximize", group["maximize"])
        check_backend(group)
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.device.type != "cpu"):  # no sync to check it (the step does)
            _check_decay(float(lr), float(group["weight_decay"]))

    # AdamW's: the same state, hyper-parameters and float32 limits for both kinds of gradient
    _new_state = AdamW._new_state
    _hyper = AdamW._hyper
    _scalars = AdamW._scalars

    # ----- the step: dense gradients as AdamW, sparse ones lazily -------------

    def _prepare(self, gi: int, group: dict[str, Any]) -> Prepared:
        """Phase 1 (Note [two-phase step]): the parameters with dense gradients as AdamW plans
        them, and a part for those with sparse ones, checked (rows made distinct); changes nothing."""
        sparse = [p for p in group["params"] if p.grad is not None and p.grad.layout != torch.strided]
        if not sparse:
            return super()._prepare(gi, group)
        dense = [p for p in group["params"] if p.grad is None or p.grad.layout == torch.strided]
        prep = super()._prepare(gi, {**group, "params": dense})
        prep.group = group
        prep.parts.append(self._sparse_part(gi, group, sparse, prep.new))
        return prep

    def _where(self, gi: int, group: dict[str, Any], p: Tensor) -> str:
        return super()._where(gi, self.param_groups[gi], p)  # its index in the whole group

    def _sparse_part(self, gi: int, group: dict[str, Any], params: list[Tensor],
                     new: dict[Tensor, dict[str, Any]]) -> Part:
        grads = _coalesced(params, [p.grad for p in params], lambda i: self._where(gi, group, params[i]))
        self._check_own_memory(gi, group, params, params)  # (rows are written in place)
        states = []
        for p in params:
            state = self.state.get(p)
            if not state:
                state = new[p] = self._new_state(p, group)
            states.append(state)
        lists = self._gather(gi, group, params, grads, states, (*self.state_keys, *self.counter_keys))
        meta = Meta(params)
        self._check_once((gi, "sparse"), params, lists, meta, new,
                         lambda: self._check_states(gi, group, params, lists, meta))
        for p, state in zip(params, states):
            if LAZY_KEYS[0] in state:
                _check_lazy(p, state[LAZY_KEYS[0]], state[LAZY_KEYS[1]], self._where(gi, group, p))
            else:  # created now, added in phase 2 (with the rest of the state, if that is new too)
                new[p] = {**state, **_no_debt(p)}
        lazy = [new.get(p, state) for p, state in zip(params, states)]
        lists += [[s[key] for s in lazy] for key in LAZY_KEYS]
        check_fits(self._scalars(group), params)
        lr = float(group["lr"])  # a CUDA tensor lr is read here: the sparse path syncs anyway
        _check_decay(lr, float(group["weight_decay"]))
        routes = route_rows(params, lists[2], lists[3], foreach=group["foreach"], fused=group["fused"])
        return Part(_SPARSE_BACKENDS, lists, routes, self._hyper(group))

    def _run(self, group: dict[str, Any], part: Part, amp: dict[str, Tensor | None]) -> None:
        if part.backends is _SPARSE_BACKENDS:
            self._may_owe = True
            _apply(part.lists, part.routes, part.hyper, **amp)
            return
        if self._may_owe:  # dense gradients for parameters that had sparse ones: pay their debt first
            for p in part.lists[0]:
                state = self.state[p]
                if LAZY_KEYS[0] in state:
                    _pay(p, state)
        super()._run(group, part, amp)

    def _compiled_step(self) -> None:
        """Under ``torch.compile`` the whole step runs outside the graph (Note [torch.compile]):
        the sparse path's shapes depend on the data (the rows a gradient touches)."""
        self._step_outside_graph()

    # ----- the lazy decay, paid on demand ---------------------------------------

    @torch.no_grad()
    def flush(self, param: Tensor | None = None, rows: Tensor | Iterable[int] | None = None) -> None:
        """Apply the weight decay that rows still owe (Note [lazy decay]), in place.

        ``flush()`` pays every row of every parameter (``state_dict()`` calls it): after it
        each weight is what dense AdamW decay would have made it, and the bookkeeping is
        dropped. ``flush(param)`` pays one parameter's rows; ``flush(param, rows)`` only the
        given rows of it, e.g. those a batch is about to read. Changes nothing where nothing
        is owed (``weight_decay=0``, or every row touched at the last step).
        """
        if param is None:
            if rows is not None:
                raise ValueError("Invalid rows: give the parameter they are rows of, flush(param, rows)")
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and LAZY_KEYS[0] in state:
                        _pay(p, state)
            return
        if not isinstance(param, Tensor) or not any(param is q for g in self.param_groups for q in g["params"]):
            raise ValueError(f"Invalid param: {type(param).__name__} of shape {tuple(getattr(param, 'shape', ()))} "
                             "is not a parameter of this optimizer")
        state = self.state.get(param)
        if not state or LAZY_KEYS[0] not in state:
            return  # nothing owed
        if rows is not None:
            rows = torch.as_tensor(rows, device=param.device).reshape(-1)
            n = param.shape[0]
            if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
                raise ValueError(f"Invalid rows: expected integer row indices, got dtype {rows.dtype}")
            if rows.numel() and not bool(((rows >= -n) & (rows < n)).all()):
                bad = rows[(rows < -n) | (rows >= n)][0].item()
                raise ValueError(f"Invalid rows: row {bad} of a parameter with {n} rows")
            rows = torch.unique(rows.remainder(n))
        _pay(param, state, rows)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, after :meth:`flush`: the weights are decayed and the state
        saved is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``; Note [lazy decay])."""
        self.flush()
        return super().state_dict()


def _check_decay(lr: float, weight_decay: float) -> None:
    """The lazy decay keeps ln(1 - lr wd): the factor must be positive (Note [lazy decay])."""
    if lr * weight_decay >= 1:
        raise ValueError(f"Invalid lr * weight_decay: {lr:g} * {weight_decay:g} = {lr * weight_decay:g} (must be < 1: "
                         "SparseAdamW keeps the logarithm of the decay factor 1 - lr * weight_decay, which must "
                         "be > 0)")


def _no_debt(p: Tensor) -> dict[str, Tensor]:
    """The lazy decay's bookkeeping when no row owes anything (Note [lazy decay])."""
    return {"decay_log": torch.zeros((), dtype=torch.float64),
            "row_decay_log": torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)}


def _check_lazy(p: Tensor, decay_log: Any, row_decay_log: Any, where: str) -> None:
    ok = (isinstance(decay_log, Tensor) and decay_log.shape == () and decay_log.dtype == torch.float64
          and decay_log.device.type == "cpu")
    if not ok:
        raise RuntimeError(f"{where} has state['decay_log'] = {decay_log!r}; expected a float64 scalar on the CPU")
    ok = (isinstance(row_decay_log, Tensor) and tuple(row_decay_log.shape) == (p.shape[0],)
          and row_decay_log.dtype == torch.float64 and row_decay_log.device == p.device
          and row_decay_log.is_contiguous())
    if not ok:
        got = (f"shape {tuple(row_decay_log.shape)}, {row_decay_log.dtype} on {row_decay_log.device}"
               if isinstance(row_decay_log, Tensor) else repr(row_decay_log))
        raise RuntimeError(f"{where} has state['row_decay_log'] of {got}; expected shape ({p.shape[0]},), "
                           f"torch.float64 on {p.device}, contiguous")


def _pay(param: Tensor, state: dict[str, Any], rows: Tensor | None = None) -> None:
    """Multiply rows of ``param`` by the decay they owe, exp(L - l[i]) (Note [lazy decay]): all of
    them in place (a row that owes nothing is multiplied by exactly 1; no temporary of the
    table's size), dropping the bookkeeping; or only ``rows`` (distinct indices)."""
    log, logs = float(state["decay_log"]), state["row_decay_log"]
    dtype = compute_dtype(param.dtype, state["exp_avg"].dtype)
    column = (-1, *(1,) * (param.dim() - 1))
    if rows is None:
        if log != 0:  # else every l[i] is 0 too: l[i] is a value L had, and L only decreases
            param.mul_(torch.exp(log - logs).to(dtype).view(column))
        for key in LAZY_KEYS:
            del state[key]
        return
    owed = torch.exp(log - logs.index_select(0, rows)).to(dtype).view(column)
    param.index_copy_(0, rows, (param.index_select(0, rows).to(dtype) * owed).to(param.dtype))
    logs.index_fill_(0, rows, log)


def sparse_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    decay_logs: list[Tensor],
    row_decay_logs: list[Tensor],
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
) -> None:
    """Functional SparseAdamW for parameters with sparse COO gradients: updates the touched rows
    of ``params`` and of the moments, ``state_steps``, ``decay_logs`` (float64 CPU scalars) and
    ``row_decay_logs`` (float64, one per row) in place.

    See :class:`SparseAdamW` for the algorithm (dense gradients: ``optimizer.adamw.adamw``).
    Everything is checked, and repeated rows summed, before anything changes.
    """
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps, decay_logs, row_decay_logs]
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "decay_logs", "row_decay_logs")
    for name, lst in zip(names, lists):
        if len(lst) != len(params):
            raise ValueError(f"Invalid {name}: {len(lst)} tensors for {len(params)} params")
    coalesced = _coalesced(params, grads, lambda i: f"params[{i}] (shape {tuple(params[i].shape)})")
    for i, p in enumerate(params):
        for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
            t, dtype = lst[i], state_dtype(p)
            if not (isinstance(t, Tensor) and t.shape == p.shape and t.device == p.device and t.dtype == dtype):
                got = f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
                raise ValueError(f"Invalid {name}[{i}]: {got}, for a parameter {p.dtype} of shape {tuple(p.shape)} "
                                 f"on {p.device} (expected {dtype}, Note [state precision])")
        s = state_steps[i]
        if not (isinstance(s, Tensor) and s.numel() == 1 and s.is_floating_point()):
            raise ValueError(f"Invalid state_steps[{i}]: {s!r} (a one-element float tensor)")
        _check_lazy(p, decay_logs[i], row_decay_logs[i], f"params[{i}]")
    _dispatch.check_own_memory(list(zip(names[:1] + names[2:4], [params, exp_avgs, exp_avg_sqs])))
    _check_decay(float(lr), float(weight_decay))
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                 maximize=maximize)
    routes = route_rows(params, exp_avgs, exp_avg_sqs, foreach=foreach, fused=fused)
    _apply([params, coalesced, *lists[2:]], routes, hyper, grad_scale=grad_scale, found_inf=found_inf)


# ----- phase 1: the gradients' rows, the backends ---------------------------------------


def _coalesced(params: list[Tensor], grads: list[Tensor], where: Callable[[int], str]) -> list[Tensor]:
    """The gradients checked, with distinct rows: duplicates summed by ``coalesce()`` (a new
    tensor), or the ``.grad`` itself where its rows are distinct already (the backends need
    distinct rows, not sorted ones: the per-row update does not depend on the order, and
    coalescing copies every value to sort them). Nothing is changed."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(g, Tensor):
            raise ValueError(f"Invalid grads[{i}]: {g!r} (a sparse COO tensor)")
        if g.layout != torch.sparse_coo:
            raise RuntimeError(f"{where(i)} has a {g.layout} gradient; SparseAdamW takes sparse COO gradients "
                               "(torch.sparse_coo, as nn.Embedding(sparse=True) gives) and dense ones")
        if p.dtype not in _SPARSE_DTYPES:
            raise RuntimeError(f"{where(i)} is {p.dtype} with a sparse gradient: SparseAdamW's sparse path updates "
                               "float16, bfloat16, float32 and float64 parameters (torch.optim.SparseAdam takes no "
                               "complex ones either)")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"{where(i)} has a sparse gradient of shape {tuple(g.shape)}, {g.dtype} on {g.device}; "
                               f"expected shape {tuple(p.shape)}, {p.dtype} on {p.device}")
        if g.sparse_dim() != 1:
            raise RuntimeError(
                f"{where(i)} has a sparse gradient with sparse_dim={g.sparse_dim()}; SparseAdamW takes row-sparse "
                "gradients (sparse_dim=1: indices of rows along dim 0, values of whole rows), as "
                "nn.Embedding(sparse=True) and nn.EmbeddingBag(sparse=True) give")
        rows = g._indices()[0]
        if rows.numel():  # before coalescing, which would write out of bounds (torch checks no invariant)
            lo, hi = torch.stack(torch.aminmax(rows)).tolist()
            if lo < 0 or hi >= p.shape[0]:
                raise RuntimeError(f"{where(i)} has a sparse gradient with row index {lo if lo < 0 else hi} "
                                   f"outside [0, {p.shape[0]})")
            if g.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
                raise RuntimeError(f"{where(i)} has a sparse gradient marked coalesced whose row indices are not "
                                   "sorted and distinct; build it with is_coalesced=False")
        distinct = g.is_coalesced() or torch.unique(rows).numel() == rows.numel()
        out.append(g if distinct else g.coalesce())
    return out


def route_rows(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *, foreach: bool | None,
           fused: bool | None) -> dict[str, list[int]]:
    """Which backend updates which tensor (Note [backends]): the fused kernels for contiguous
    tensors in a dtype pair they take, the reference otherwise. Compiles the C loop or imports
    Triton now (phase 1); a ``fused=True`` that cannot be met raises here."""
    backend = _dispatch.group_backend(device_types(params), foreach, fused)
    if backend != "fused":
        return {"reference": list(range(len(params)))}
    strict = bool(fused)
    routes: dict[str, list[int]] = {}
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        name = "reference"
        if p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and m.dtype == v.dtype:
            if p.device.type in _dispatch.TRITON_DEVICES:
                kernels = _load_triton(strict)
                if kernels is not None and (p.dtype, m.dtype) in kernels.SUPPORTED:
                    name = "triton"
            elif p.device.type == "cpu":
                fns = _fused_cpu.library(_SPARSE_KERNEL, strict=strict)
                if fns is not None and (p.dtype, m.dtype) in fns:
                    name = "c"
        routes.setdefault(name, []).append(i)
    return routes


def _load_triton(strict: bool) -> Any:
    """The sparse GPU kernel (``_sparse_triton``), or None: ``_dispatch.import_kernels``."""
    return _dispatch.import_kernels("_sparse_triton", strict, "SparseAdamW's GPU kernels", "the reference",
                                    "fused=False")


# ----- phase 2 ---------------------------------------------------------------------------


def _apply(lists: list[list[Any]], routes: dict[str, list[int]], hyper: dict[str, Any], *,
           grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Phase 2: GradScaler's skip and unscale (Note [GradScaler], on the host), the step counts
    (Note [step counters]), each backend on its tensors, then the decay logs (Note [lazy decay])."""
    if found_inf is not None and float(found_inf) != 0:  # inf/nan in the gradients: change nothing
        return
    if grad_scale is not None:
        lists = [lists[0], [_unscaled(g, grad_scale) for g in lists[1]], *lists[2:]]
    _dispatch.count(_SPARSE_BACKENDS, [lists[4]])  # (with the C loop's own counter where it is built)
    for name, idx in routes.items():
        sub = lists if len(idx) == len(lists[0]) else pick(lists, idx)
        backend = _load_triton(False).sparse_adamw if name == "triton" else getattr(_SPARSE_BACKENDS, name)
        backend(*sub, **hyper)
    for decay_log, (_, after) in zip(lists[5], _logs(lists[5], hyper["lr"], hyper["weight_decay"])):
        decay_log.fill_(after)


def _unscaled(grad: Tensor, grad_scale: Tensor) -> Tensor:
    """A gradient (distinct rows) divided by GradScaler's scale (a new tensor; the .grad stays)."""
    values = grad._values() / grad_scale.to(grad.device).reshape(())
    return torch.sparse_coo_tensor(grad._indices(), values, grad.shape, is_coalesced=grad.is_coalesced(),
                                   check_invariants=False)


def _logs(decay_logs: list[Tensor], lr: float | Tensor, weight_decay: float) -> list[tuple[float, float]]:
    """Per tensor (L before this step, L after it): L + ln(1 - lr wd) (Note [lazy decay])."""
    step = math.log1p(-float(lr) * weight_decay)
    return [(before, before + step) for before in torch.stack(decay_logs).tolist()] if decay_logs else []


# ----- the backends ------------------------------------------------------------------------


def _single_tensor_sparse_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    decay_logs: list[Tensor],
    row_decay_logs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
) -> None:
    """The reference: one tensor at a time over its (distinct) rows, one line per equation of
    :class:`SparseAdamW` (those of AdamW's reference, on the rows gathered with index_select)."""
    lr = float(host_value(lr))
    decay = 1 - lr * weight_decay                          # this step's factor
    steps = bias_corrections(lr, beta1, beta2, state_steps, correct_bias)
    logs = _logs(decay_logs, lr, weight_decay)
    for i, (param, grad, m_all, v_all, row_log) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs,
                                                                  row_decay_logs)):
        rows = grad._indices()[0]
        if rows.numel() == 0:                              # nothing touched: every row owes one factor more
            continue
        dtype = compute_dtype(param.dtype, m_all.dtype)    # Note [state precision]
        p = param.index_select(0, rows).to(dtype)
        m = m_all.index_select(0, rows).to(dtype)
        v = v_all.index_select(0, rows).to(dtype)
        g = grad._values().to(dtype)
        if maximize:
            g = -g
        (neg_step_size, bc2_sqrt), (before, after) = steps[i], logs[i]

        owed = torch.exp(before - row_log.index_select(0, rows)).mul_(decay)  # prod (1 - lr_s wd) since paid
        p.mul_(owed.to(dtype).view(-1, *(1,) * (p.dim() - 1)))                # theta <- theta * owed
        m.lerp_(g, 1 - beta1)                              # m_t = b1 m + (1 - b1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)      # v_t = b2 v + (1 - b2) g^2
        denom = (v.sqrt() / bc2_sqrt).add_(eps)            # sqrt(v_t / (1 - b2^t)) + eps
        p.addcdiv_(m, denom, value=neg_step_size)          # theta -= lr / (1 - b1^t) m_t / denom
        row_log.index_fill_(0, rows, after)                # l[i] = L_t: paid up to this step

        param.index_copy_(0, rows, p.to(param.dtype))      # bf16/fp16: rounded to nearest, once
        m_all.index_copy_(0, rows, m.to(m_all.dtype))
        v_all.index_copy_(0, rows, v.to(v_all.dtype))


class _RowKernel(_fused_cpu.Kernel):
    """A C update whose loop visits the touched rows of sparse gradients (csrc/sparse_rows.c)
    instead of every element: built, compiled and cached as every kernel (Note [fused CPU])."""

    @property
    def loop(self) -> str:
        return "sparse_rows.c"


# AdamW's C body, verbatim: the loop sets `decay` to the factor the row owes (Note [lazy decay])
_SPARSE_KERNEL = _RowKernel(name="sparse_adamw", states=("m", "v"), scalars=("w1", "beta2", "w2", "eps"),
                            per_tensor=("neg_step_size", "bc2_sqrt"), body=AdamW.backends.c_kernel.body)


def _fused_c_sparse_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    decay_logs: list[Tensor],
    row_decay_logs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    maximize: bool,
) -> None:
    """The C loop over the touched rows (csrc/sparse_rows.c): each row once, in one call per dtype
    pair for all tensors; contiguous tensors (the dispatcher sends no others)."""
    lr = float(lr)
    fns = _fused_cpu.library(_SPARSE_KERNEL, strict=False)
    steps = bias_corrections(lr, beta1, beta2, state_steps, correct_bias)
    logs = _logs(decay_logs, lr, weight_decay)
    scalars = (ctypes.c_double * 4)(1 - beta1, beta2, 1 - beta2, eps)
    calls: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        calls.setdefault((p.dtype, m.dtype), []).append(i)
    for key, idx in calls.items():
        n = len(idx)
        lazy = (ctypes.c_double * (3 * n))()  # per tensor: L before, L after, 1 - lr wd
        keep, ptrs, lens, first, per_tensor = [], [], [], [0], []
        for k, i in enumerate(idx):
            p, grad = params[i], grads[i]
            rows, values = grad._indices()[0].contiguous(), grad._values().contiguous()
            keep += [rows, values]  # alive through the call
            lazy[3 * k:3 * k + 3] = [*logs[i], 1 - lr * weight_decay]
            ptrs += [p.data_ptr(), values.data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                     rows.data_ptr(), row_decay_logs[i].data_ptr(), ctypes.addressof(lazy) + 24 * k]
            lens.append(p.numel() // p.shape[0] if p.shape[0] else 0)
            first.append(first[-1] + rows.numel())
            per_tensor += steps[i]
        fns[key](n, (ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_int64 * n)(*lens),
                 (ctypes.c_int64 * (n + 1))(*first), scalars, (ctypes.c_double * (2 * n))(*per_tensor),
                 int(maximize), None, torch.get_num_threads())


_SPARSE_BACKENDS = _dispatch.Backends(
    names=("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "decay_logs", "row_decay_logs"),
    reference=_single_tensor_sparse_adamw,
    foreach=_single_tensor_sparse_adamw,  # no multi-tensor form: each tensor has its own rows
    c=_fused_c_sparse_adamw,
    c_kernel=_SPARSE_KERNEL,
    n_states=2,
    triton="sparse_adamw",  # in _sparse_triton.py
)
