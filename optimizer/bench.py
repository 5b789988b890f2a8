"""``python -m optimizer bench``: median step time of every backend and of the peers,
measured side by side in one run, as ratios and as a fraction of the bandwidth
measured in the same run.

An optimizer step reads and writes each element once at best, so its floor is
bytes / bandwidth: AdamW moves 3 P + 4 S bytes per parameter (read p, g, m, v;
write p, m, v; P and S the bytes of a parameter and of a state value: 28 in
fp32), Lion 3 P + 2 S (20 in fp32). Each implementation is credited with the
bytes of its own state as it holds it after the timed steps: ``2 S`` is twice the
bytes of its per-element state tensors per parameter, so 8-bit states count their
codes, their scales and the tensors too small to quantise (scalar counters are
left out: they are not moved per element). The "state B/param" column is the
memory of all of its state tensors, counters included, per parameter.

All candidates share one list of parameters and gradients (the rows with bf16
parameters and stochastic rounding, in a run of other parameters, share a bf16
copy of it). Where their states fit in memory together (the CPU models) they are
timed in interleaved rounds, so that drift of the machine spreads over all of
them; otherwise one after the other, each freed before the next is built. Peers
that are not installed, or fail their first step on this device, are skipped and
listed.

``--model embedding-256k-sparse`` (:data:`SPARSE_MODELS`) times the sparse workload instead:
an embedding table of which a step touches 1 % of the rows (a different random set each
step, one entry per lookup and some rows twice, as ``nn.Embedding(sparse=True)`` gives),
our SparseAdamW against dense fused ``torch.optim.AdamW`` (fed the same gradient made
dense) and ``torch.optim.SparseAdam``, as ratios to both in one run (:func:`run_sparse`).

Muon (Note [the Muon rows]): where a list has hidden matrices, our Muon (Muon for them, AdamW
for the rest, one optimizer) is timed against what a script writes today, ``torch.optim.Muon``
on the same matrices plus torch's fused AdamW on the rest, with the Newton-Schulz iteration of
each timed alone and set against a matrix product's throughput measured in the same run.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import platform
import statistics
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import AdamW, Lion, Muon, SparseAdamW
from . import muon as _muon
from .factory import OPTIMIZERS, muon_labels
from .muon import ns_flops


def gpt2_shapes(layers: int, dim: int, vocab: int, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, dim), (ctx, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def llama_shapes(layers: int = 22, dim: int = 2048, hidden: int = 5632, kv: int = 256,
                 vocab: int = 32000) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim, dim), (kv, dim), (kv, dim), (dim, dim), (dim,),
                   (hidden, dim), (hidden, dim), (dim, hidden)]
    return shapes + [(dim,), (vocab, dim)]


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-30m": lambda: gpt2_shapes(6, 512, 16384),  # 28 M params, 76 tensors: sized for a 2-core CPU
    "gpt2-124m": lambda: gpt2_shapes(12, 768, 50257),  # 124 M params, 148 tensors
    "llama-1.1b": llama_shapes,  # 1.10 B params, 201 tensors
    # many small tensors: the host work of a step (checks, plans, launches) against the bytes
    "small-400x64x64": lambda: [(64, 64)] * 400,  # 1.6 M params
    "small-2000x256": lambda: [(256,)] * 2000,  # 0.5 M params
}
SUITES = {"many-small": ["small-400x64x64", "small-2000x256"]}  # --model names that run several lists
# the matrices of a named list that are not hidden layers, by their place in a list of n tensors:
# create_optimizer(model, "muon") gives them to AdamW (factory.muon_labels); the lists not named here
# (small-*) have none
NOT_HIDDEN: dict[str, Callable[[int], set[int]]] = {
    "gpt2-30m": lambda n: {0, 1},  # token and position embeddings (the output layer is tied to the first)
    "gpt2-124m": lambda n: {0, 1},
    "llama-1.1b": lambda n: {0, n - 1},  # the embedding and the untied output layer
}
# sparse workloads (run_sparse): --model name -> (rows, row width, fraction of the rows a step touches)
SPARSE_MODELS: dict[str, tuple[int, int, float]] = {
    "embedding-256k-sparse": (262_144, 1024, 0.01),  # 268 M fp32 parameters, 2,621 rows a step
    "embedding-16k-sparse": (16_384, 256, 0.01),  # a small one, for tests
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # the side of matmul_throughput's matrices, by device type


def matmul_throughput(dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of one square product ``a @ b`` in ``dtype`` (2 n^3 flops): the roofline of the
    Newton-Schulz iteration, whose products are of the same kind. n is large enough for the
    machine's matrix units to run near their best (:data:`MATMUL_SIZE`)."""
    n = MATMUL_SIZE.get(device.type, 8192)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _median_ms(lambda: a @ b, device) / 1e6


def bandwidth(n: int, device: torch.device) -> dict[str, float]:
    """GB/s (bytes read + written) of a copy into other memory and of an in-place ``a += b``
    (a step updates its buffers in place, so on a CPU the latter is its roofline)."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    dst = torch.empty_like(a)
    copy = 2 * n * 4 / _median_ms(lambda: dst.copy_(a), device) / 1e6
    inplace = 3 * n * 4 / _median_ms(lambda: a.add_(b), device) / 1e6
    return {"copy": copy, "inplace": inplace}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Row(NamedTuple):
    """One implementation to time."""

    name: str
    algorithm: str  # "adamw", "lion" or "muon"
    make: Callable[[list[torch.nn.Parameter]], Any]  # params -> optimizer (or a namespace with .step, .optimizer)
    param_dtype: torch.dtype | None = None  # its own parameters' dtype; None: the run's --dtype
    peer: str | None = None  # another library's: skipped (and listed) where it cannot run
    # Muon rows: params -> (a call running this row's Newton-Schulz on the matrices' gradients, its dtype)
    newton_schulz: Callable[[list[torch.nn.Parameter]], tuple[Callable[[], Any], torch.dtype]] | None = None


# Note [the Muon rows]
# ~~~~~~~~~~~~~~~~~~~~
# Both sides get the same split of the list (``muon_mask``): the hidden matrices to Muon, the other
# tensors to AdamW, in a decay group (embeddings, output layer) and a no-decay one (1-D), as
# create_optimizer(model, "muon") splits a model; a list without hidden matrices has no Muon rows.
# Ours is one optimizer (optimizer.Muon with use_muon groups), theirs torch.optim.Muon on the
# matrices plus torch.optim.AdamW(fused=True) on the rest (:class:`_TorchMuonPair`), both at the
# registry's settings for "muon" (the hyper-parameters do not change the work). The iteration is
# also timed alone, on the matrices' gradients, as each row runs it (ours batched by shape, torch's
# one matrix at a time): its flops (:func:`ns_flops`) per second, against a product measured in the
# same run and dtype (:func:`matmul_throughput`), say how far it is from the machine's roofline.


def _split(ps: list[torch.nn.Parameter], mask: list[bool]) -> tuple[list[Any], list[Any], list[Any]]:
    """(the hidden matrices, AdamW's tensors with weight decay, those without: fewer than 2 dimensions)."""
    return ([p for p, m in zip(ps, mask) if m], [p for p, m in zip(ps, mask) if not m and p.dim() >= 2],
            [p for p, m in zip(ps, mask) if not m and p.dim() < 2])


def _adamw_groups(decay: list[Any], no_decay: list[Any], **adamw: Any) -> list[dict[str, Any]]:
    return ([{"params": decay, **adamw}] if decay else []) + (
        [{"params": no_decay, **adamw, "weight_decay": 0.0}] if no_decay else [])


def ours_muon(ps: list[torch.nn.Parameter], mask: list[bool], **kwargs: Any) -> Muon:
    """Our Muon on a list split by ``mask`` (Note [the Muon rows]), at the registry's settings."""
    spec = OPTIMIZERS["muon"]
    mats, decay, no_decay = _split(ps, mask)
    groups = [{"params": mats}, *_adamw_groups(decay, no_decay, use_muon=False)]
    return Muon(groups, lr=spec.lr, weight_decay=spec.weight_decay, **{**spec.options, **kwargs})


class _TorchMuonPair:
    """torch.optim.Muon on the hidden matrices and torch's fused AdamW on the rest, stepped one after
    the other: what a script writes with torch alone (Note [the Muon rows])."""

    def __init__(self, ps: list[torch.nn.Parameter], mask: list[bool]) -> None:
        spec = OPTIMIZERS["muon"]
        mats, decay, no_decay = _split(ps, mask)
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Muon(mats, lr=spec.lr, weight_decay=spec.weight_decay)]
        groups = _adamw_groups(decay, no_decay, weight_decay=spec.weight_decay)
        if groups:
            self.optimizers.append(torch.optim.AdamW(groups, lr=spec.options["adamw_lr"], betas=(0.9, 0.95),
                                                     fused=True))

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    @property
    def state(self) -> dict[Any, dict[str, Any]]:  # (what state_bytes reads)
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}


def _ours_newton_schulz(ps: list[torch.nn.Parameter], mask: list[bool],
                        batched: bool = True) -> tuple[Callable[[], Any], torch.dtype]:
    """Our iteration on the matrices' gradients: batched by shape (the default backend's), or one
    matrix at a time (the reference's)."""
    grads = [p.grad for p in _split(ps, mask)[0]]
    dtype = _muon.ns_dtype_of(None, grads[0])
    args = (_muon.NS_COEFFICIENTS, 5, 1e-7, dtype)
    if not batched:
        return (lambda: [_muon._newton_schulz(g, *args) for g in grads]), dtype
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for g in grads:
        by_shape.setdefault(tuple(g.shape), []).append(g)
    stacks = [torch.stack(gs) for gs in by_shape.values()]
    return (lambda: [_muon._batched_newton_schulz(s, *args) for s in stacks]), dtype


def _torch_newton_schulz(ps: list[torch.nn.Parameter], mask: list[bool]) -> tuple[Callable[[], Any], torch.dtype]:
    """torch.optim.Muon's iteration (always in bf16), one matrix at a time, as its step runs it."""
    from torch.optim._muon import _zeropower_via_newtonschulz as zeropower

    grads = [p.grad for p in _split(ps, mask)[0]]
    return (lambda: [zeropower(g, _muon.NS_COEFFICIENTS, 5, 1e-7) for g in grads]), torch.bfloat16


def muon_rows(device: torch.device, state_dtype: torch.dtype | None, mask: list[bool],
              skipped: dict[str, str]) -> list[Row]:
    """Our Muon (default, 8-bit, and on the CPU the reference) and torch.optim.Muon + fused AdamW on
    the list split by ``mask``; none for a list without hidden matrices (Note [the Muon rows])."""
    if not any(mask):
        return []
    kw = {} if state_dtype is None else {"state_dtype": state_dtype}
    rows = []
    if hasattr(torch.optim, "Muon"):
        rows.append(Row("torch Muon + AdamW fused", "muon", lambda ps: _TorchMuonPair(ps, mask),
                        newton_schulz=lambda ps: _torch_newton_schulz(ps, mask)))
    else:
        skipped["torch Muon + AdamW fused"] = f"torch.optim.Muon needs torch >= 2.9 (this is {torch.__version__})"
    rows += [
        Row("ours Muon default", "muon", lambda ps: ours_muon(ps, mask, **kw),
            newton_schulz=lambda ps: _ours_newton_schulz(ps, mask)),
        Row("ours Muon 8-bit", "muon", lambda ps: ours_muon(ps, mask, state_dtype=torch.uint8)),
    ]
    if device.type == "cpu":
        rows.append(Row("ours Muon reference", "muon", lambda ps: ours_muon(ps, mask, foreach=False, fused=False, **kw),
                        newton_schulz=lambda ps: _ours_newton_schulz(ps, mask, batched=False)))
    return rows


def _compiled(make: Callable[[list[torch.nn.Parameter]], Any]) -> Callable[[list[torch.nn.Parameter]], Any]:
    """``make``'s optimizer with its step compiled (``torch.compile(opt.step)``)."""
    def build(ps: list[torch.nn.Parameter]) -> Any:
        opt = make(ps)
        return types.SimpleNamespace(step=torch.compile(opt.step), optimizer=opt)

    return build


# the 8-bit peers: (row name, algorithm, module, class name); tried wherever importable, and
# skipped (listed in the output) where not installed or where their first step fails
PEERS_8BIT = [
    ("bitsandbytes AdamW8bit", "adamw", "bitsandbytes", "optim.AdamW8bit"),
    ("bitsandbytes Lion8bit", "lion", "bitsandbytes", "optim.Lion8bit"),
    ("torchao AdamW8bit", "adamw", "torchao", "optim.AdamW8bit"),
]


def _peer_class(module: str, path: str) -> Any:
    """``module.path`` (torchao's optimizers also under their older home, prototype.low_bit_optim)."""
    mod = importlib.import_module(module)
    for where in (path, f"prototype.low_bit_optim.{path.rsplit('.', 1)[-1]}"):
        obj: Any = mod
        try:
            for part in where.split("."):
                obj = getattr(obj, part, None) or importlib.import_module(f"{obj.__name__}.{part}")
            return obj
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{module} has no {path}")


def candidates(device: torch.device, state_dtype: torch.dtype | None, compile: bool = False,
               skipped: dict[str, str] | None = None, muon_mask: list[bool] | None = None) -> list[Row]:
    """Every implementation worth timing here. ``state_dtype`` is passed to ours (not to the
    8-bit rows). With ``compile``, also each of ours and torch's AdamW with
    ``torch.compile(opt.step)``. ``muon_mask`` (which tensors are hidden matrices) adds the Muon
    rows (:func:`muon_rows`). Peers that cannot be imported go into ``skipped`` with why."""
    skipped = {} if skipped is None else skipped
    kw = {} if state_dtype is None else {"state_dtype": state_dtype}
    u8, bf16 = torch.uint8, torch.bfloat16
    rows: list[Row] = [
        Row("torch AdamW fused", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        Row("torch AdamW foreach", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        Row("ours AdamW default", "adamw", lambda ps: AdamW(ps, lr=1e-3, **kw)),
        Row("ours AdamW correct_bias=False", "adamw", lambda ps: AdamW(ps, lr=1e-3, correct_bias=False, **kw)),
        Row("ours AdamW foreach", "adamw", lambda ps: AdamW(ps, lr=1e-3, foreach=True, **kw)),
        Row("ours Lion default", "lion", lambda ps: Lion(ps, lr=1e-4, **kw)),
        Row("ours Lion foreach", "lion", lambda ps: Lion(ps, lr=1e-4, foreach=True, **kw)),
    ]
    if device.type == "cpu" or compile:
        rows += [
            Row("ours AdamW reference", "adamw", lambda ps: AdamW(ps, lr=1e-3, foreach=False, fused=False, **kw)),
            Row("ours Lion reference", "lion", lambda ps: Lion(ps, lr=1e-4, foreach=False, fused=False, **kw)),
        ]
    if compile:
        rows.append(Row("torch AdamW for-loop", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)))
        rows += [r._replace(name=f"{r.name} compiled", make=_compiled(r.make)) for r in rows
                 if r.name.startswith(("ours", "torch AdamW"))]
    # lean states and parameters (Note [8-bit states], Note [stochastic rounding]): the default backends
    rows += [
        Row("ours AdamW 8-bit", "adamw", lambda ps: AdamW(ps, lr=1e-3, state_dtype=u8)),
        Row("ours Lion 8-bit", "lion", lambda ps: Lion(ps, lr=1e-4, state_dtype=u8)),
        Row("ours AdamW bf16 params SR", "adamw", lambda ps: AdamW(ps, lr=1e-3, stochastic_rounding=True, **kw), bf16),
        Row("ours Lion bf16 params SR", "lion", lambda ps: Lion(ps, lr=1e-4, stochastic_rounding=True, **kw), bf16),
    ]
    rows += muon_rows(device, state_dtype, muon_mask or [], skipped)
    try:
        import lion_pytorch

        rows.append(Row("lion-pytorch", "lion", lambda ps: lion_pytorch.Lion(ps, lr=1e-4), peer="lion-pytorch"))
        if device.type == "cuda":
            rows.append(Row("lion-pytorch triton", "lion", lambda ps: lion_pytorch.Lion(ps, lr=1e-4, use_triton=True),
                            peer="lion-pytorch"))
    except ImportError:
        skipped["lion-pytorch"] = "lion-pytorch is not installed"
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            rows.append(Row("bitsandbytes AdamW32bit", "adamw", lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3),
                            peer="bitsandbytes"))
            rows.append(Row("bitsandbytes Lion32bit", "lion", lambda ps: bnb.optim.Lion32bit(ps, lr=1e-4),
                            peer="bitsandbytes"))
    except ImportError:
        pass
    lrs = {"adamw": 1e-3, "lion": 1e-4}
    for name, algorithm, module, path in PEERS_8BIT:
        try:
            cls = _peer_class(module, path)
        except Exception as err:  # noqa: BLE001 - not installed, or an install that cannot load here
            missing = isinstance(err, ModuleNotFoundError) and err.name == module
            skipped[name] = f"{module} is not installed" if missing else f"{module}: {_first_line(err)}"
            continue
        rows.append(Row(name, algorithm, lambda ps, cls=cls, lr=lrs[algorithm]: cls(ps, lr=lr), peer=module))
    return rows


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:80]


def _tensor_bytes(t: torch.Tensor) -> int:
    """The memory a state tensor holds; a tensor subclass (torchao's 8-bit states) by its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt: Any) -> tuple[int, int]:
    """Bytes of an optimizer's state as it holds it: (every state tensor: codes, scales, counters,
    all; the per-element ones, which a step reads and writes: all but one-element counters)."""
    opt = getattr(opt, "optimizer", opt)  # a compiled row's namespace
    total = per_element = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                size = _tensor_bytes(value)
                total += size
                per_element += size if value.numel() > 1 else 0
    return total, per_element


def model_shapes(model: str) -> list[tuple[int, ...]]:
    """A named list, or ``module:function`` returning an nn.Module (or a list of shapes)."""
    return model_split(model)[0]


def model_split(model: str) -> tuple[list[tuple[int, ...]], list[bool]]:
    """:func:`model_shapes`, and which of them are hidden matrices, which Muon updates (Note [the
    Muon rows]): a named list's 2-D tensors but those of :data:`NOT_HIDDEN`; an nn.Module's
    2-D tensors that :func:`~optimizer.factory.muon_labels` gives Muon (a conv kernel goes to
    AdamW here: torch.optim.Muon takes 2-D tensors only, and both sides get the same split); a
    list of shapes' 2-D ones, as create_optimizer splits a list of tensors."""
    if model in MODELS:
        shapes = MODELS[model]()
        not_hidden = NOT_HIDDEN.get(model, lambda n: set())(len(shapes))
        return shapes, [len(s) == 2 and i not in not_hidden for i, s in enumerate(shapes)]
    module_name, _, attr = model.partition(":")
    try:
        built = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Invalid --model: {model!r} is neither one of {sorted(MODELS)} nor an importable "
                         f"module:function ({err})") from None
    if isinstance(built, torch.nn.Module):
        labels = muon_labels(built)
        named = [(n, p) for n, p in built.named_parameters() if p.requires_grad]
        return [tuple(p.shape) for _, p in named], [labels[n] == "muon" and p.dim() == 2 for n, p in named]
    shapes = [tuple(s) for s in built]
    return shapes, [len(s) == 2 for s in shapes]


def run(model: str, device_name: str, reps: int, only: list[str] | None, json_path: str | None,
        dtype: str = "fp32", state_dtype: str | None = None, compile: bool = False,
        command: str = "python -m optimizer bench") -> int:
    """Time every candidate on ``model``'s list (each list of a suite such as ``many-small``) and
    print the table; optionally write the JSON (a list for a suite), from which the repository's
    ``tools/bench_tables.py`` writes the tables of its README and docs."""
    results = []
    if model in SPARSE_MODELS:
        if dtype != "fp32" or state_dtype or compile:
            raise ValueError(f"Invalid options for --model {model}: the sparse table is fp32 with the optimizers' "
                             "own state, eager (no --dtype, --state-dtype or --compile)")
        results.append({**run_sparse(model, device_name, reps, only), "command": command})
    for name in [] if model in SPARSE_MODELS else SUITES.get(model, [model]):
        results.append({**run_one(name, device_name, reps, only, dtype, state_dtype, compile), "command": command})
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
        print(f"wrote {json_path}")
    return 0


def load_results(path: str) -> list[dict[str, Any]]:
    """The runs of a JSON file that ``--json`` wrote (one run, or a list for a suite)."""
    not_ours = ValueError(f"{path!r} is not a JSON file written by python -m optimizer bench --json")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            raise not_ours from None
    results = data if isinstance(data, list) else [data]
    if not results or not all(isinstance(r, dict) and {"model", "rows", "date", "machine"} <= set(r) for r in results):
        raise not_ours
    return results


def run_one(model: str, device_name: str, reps: int, only: list[str] | None,
            dtype: str = "fp32", state_dtype: str | None = None, compile: bool = False) -> dict[str, Any]:
    """One parameter list: the table printed, the results returned."""
    device = torch.device(device_name)
    shapes, muon_mask = model_split(model)
    param_dtype = DTYPES[dtype]
    ours_state = DTYPES[state_dtype] if state_dtype else None
    n = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=param_dtype))
              for s in shapes]
    for p in params:
        p.grad = (torch.randn_like(p) * 1e-3)
    skipped: dict[str, str] = {}
    chosen = lambda name: not only or any(o.lower() in name.lower() for o in only)  # noqa: E731
    rows = [r for r in candidates(device, ours_state, compile, skipped, muon_mask) if chosen(r.name)]
    skipped = {name: why for name, why in skipped.items() if chosen(name)}
    params_of = {param_dtype: params}  # the rows of other parameters (bf16 with stochastic rounding) share a copy
    for dt in {r.param_dtype for r in rows} - {None, param_dtype}:
        params_of[dt] = [torch.nn.Parameter(p.detach().to(dt)) for p in params]
        for p, q in zip(params, params_of[dt]):
            q.grad = p.grad.to(dt)
    bw = bandwidth(n, device)
    # interleave where every candidate's state fits at once (the CPU lists), else one at a time
    total_state = sum(n * (4 if r.algorithm == "lion" else 8) for r in rows)
    interleave = device.type == "cpu" or total_state < 0.5 * torch.cuda.get_device_properties(device).total_memory
    times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    opts: dict[str, Any] = {}
    moved: dict[str, float] = {}  # bytes per parameter a step reads and writes
    held: dict[str, float] = {}  # bytes of state per parameter

    def build(row: Row) -> Callable[[], Any] | None:
        try:
            opt = row.make(params_of[row.param_dtype or param_dtype])
            opt.step()  # state allocation and any one-time compile happen here, untimed
        except Exception as err:  # noqa: BLE001 - a peer that does not run on this device
            if row.peer is not None:
                skipped[row.name] = f"{row.peer} on {device.type}: {type(err).__name__}: {_first_line(err)}"
                return None
            if not isinstance(err, (RuntimeError, TypeError, ValueError)):
                raise
            failed[row.name] = str(err).strip().splitlines()[0][:60]  # e.g. an implementation unsupported here
            return None
        opts[row.name] = opt
        times[row.name] = []
        return opt.step

    def measure(row: Row) -> None:
        """Bytes of the state the row's optimizer holds after its steps."""
        total, per_element = state_bytes(opts.pop(row.name))
        size = (row.param_dtype or param_dtype).itemsize
        moved[row.name] = 3 * size + 2 * per_element / n  # read p, g, states; write p, states
        held[row.name] = total / n

    def timed(name: str, step: Callable[[], Any]) -> None:
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times[name].append((time.perf_counter() - t0) * 1e3)

    if interleave:
        steps = {r.name: s for r in rows if (s := build(r)) is not None}
        for _ in range(2):
            for s in steps.values():
                s()
        for _ in range(reps):
            for name, s in steps.items():
                timed(name, s)
        for r in rows:
            if r.name in opts:
                measure(r)
    else:
        for r in rows:
            s = build(r)
            if s is not None:
                for _ in range(2):
                    s()
                for _ in range(reps):
                    timed(r.name, s)
                measure(r)
            s = None
            torch.cuda.empty_cache()
    after = bandwidth(n, device)  # measured again: a machine busy at the start would inflate the fractions
    bw = {k: max(bw[k], after[k]) for k in bw}
    medians = {name: statistics.median(t) for name, t in times.items()}
    ns = time_newton_schulz([r for r in rows if r.name in medians], params_of, param_dtype, reps, device)
    ns_gflop = sum(ns_flops(s) for s, m in zip(shapes, muon_mask) if m) / 1e9  # of one step, every matrix
    base = {k: medians.get(f"torch AdamW {k}") for k in ("fused", "foreach")}
    base["lion-pytorch"] = medians.get("lion-pytorch triton", medians.get("lion-pytorch"))
    base["muon"] = medians.get("torch Muon + AdamW fused")
    algorithm = {r.name: r.algorithm for r in rows}
    muon = any(algorithm[name] == "muon" for name in medians)
    matmul = ns.pop("matmul", {})
    print(f"{model}: {len(shapes)} tensors, {n / 1e6:.1f} M params, {dtype} params, state {state_dtype or 'default'}, "
          f"{device}, torch {torch.__version__}; measured bandwidth: copy {bw['copy']:.1f} GB/s, in-place "
          f"{bw['inplace']:.1f} GB/s; median of {reps}{', interleaved' if interleave else ''}")
    if muon:
        print(f"Muon: {sum(muon_mask)} hidden matrices, Newton-Schulz {ns_gflop:.1f} GFLOP a step; measured matmul: "
              + ", ".join(f"{_DTYPE_NAMES[dt]} {g:.0f} GFLOP/s" for dt, g in matmul.items()))
    width = max([30, *map(len, medians)])
    best = max(bw.values())  # a CPU copy also reads the destination (write-allocate): in-place is its roofline
    head = (f"{'implementation':{width}s} {'ms/step':>9s} {'B/param':>8s} {'state B/param':>13s} {'GB/s':>7s} "
            f"{'of bw':>6s} {'/torch fused':>13s} {'/torch foreach':>15s} {'/lion-pytorch':>14s}")
    print(head + (f" {'/eager':>7s}" if compile else "")
          + (f" {'/torch Muon':>12s} {'NS ms':>8s} {'NS GFLOP/s':>11s} {'of matmul':>10s}" if muon else ""))
    out = []
    for name, ms in medians.items():
        gbs = moved[name] * n / ms / 1e6
        ratios = [f"{ms / base[k]:.2f}x" if base[k] else "-" for k in ("fused", "foreach", "lion-pytorch")]
        eager = medians.get(name.removesuffix(" compiled")) if name.endswith(" compiled") else None
        vs_muon = ms / base["muon"] if base["muon"] and algorithm[name] == "muon" else None
        ns_ms, ns_dtype = ns.get(name, (None, None))
        ns_rate = ns_gflop / ns_ms * 1e3 if ns_ms else None
        of_matmul = ns_rate / matmul[ns_dtype] if ns_rate else None
        print(f"{name:{width}s} {ms:9.2f} {_bytes(moved[name]):>8s} {held[name]:13.2f} {gbs:7.1f} {gbs / best:6.0%} "
              f"{ratios[0]:>13s} {ratios[1]:>15s} {ratios[2]:>14s}"
              + (f" {f'{ms / eager:.2f}x' if eager else '-':>7s}" if compile else "")
              + (f" {_ratio(vs_muon):>12s} {_number(ns_ms, '.2f'):>8s} {_number(ns_rate, '.0f'):>11s} "
                 f"{_number(of_matmul, '.0%'):>10s}" if muon else ""))
        out.append({"name": name, "ms": ms, "bytes_per_param": moved[name], "state_bytes_per_param": held[name],
                    "gb_per_s": gbs,
                    "fraction_of_bandwidth": gbs / best,
                    "fraction_of_copy_bandwidth": gbs / bw["copy"],
                    "fraction_of_inplace_bandwidth": gbs / bw["inplace"],
                    "vs_torch_fused": ms / base["fused"] if base["fused"] else None,
                    "vs_torch_foreach": ms / base["foreach"] if base["foreach"] else None,
                    "vs_lion_pytorch": ms / base["lion-pytorch"] if base["lion-pytorch"] else None,
                    "vs_eager": ms / eager if eager else None,
                    **({"vs_torch_muon": vs_muon, "ns_ms": ns_ms, "ns_dtype": _DTYPE_NAMES.get(ns_dtype),
                        "ns_gflop_per_s": ns_rate, "fraction_of_matmul": of_matmul} if muon else {})})
    for name, why in failed.items():
        print(f"{name:{max(30, len(name))}s} {'n/a':>9s}  {why}")
    order = ["lion-pytorch", *(peer[0] for peer in PEERS_8BIT)]  # the peers' order, not the order they failed in
    skipped = dict(sorted(skipped.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if skipped:
        print("skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    result = {"model": model, "tensors": len(shapes), "params": n, "dtype": dtype, "state_dtype": state_dtype,
              "device": str(device), "machine": machine(device), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "bandwidth_gb_per_s": bw, "reps": reps, "interleaved": interleave,
              "rows": out, "unavailable": failed, "skipped": skipped,
              "versions": {r.peer: _version(r.peer) for r in rows if r.peer and r.name in medians}}
    if muon:
        result["muon"] = {"matrices": sum(muon_mask), "ns_gflop_per_step": ns_gflop, "ns_steps": 5,
                          "matmul_gflop_per_s": {_DTYPE_NAMES[dt]: g for dt, g in matmul.items()},
                          "matmul_size": MATMUL_SIZE.get(device.type, 8192)}
    return result


_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def time_newton_schulz(rows: list[Row], params_of: dict[torch.dtype, list[torch.nn.Parameter]],
                       param_dtype: torch.dtype, reps: int, device: torch.device) -> dict[Any, Any]:
    """The median ms of each Muon row's Newton-Schulz iteration alone, and its dtype: {name: (ms,
    dtype)}, in interleaved rounds; under "matmul", :func:`matmul_throughput` in each of those
    dtypes, measured before and after the rounds (the better of the two, as the bandwidth)."""
    calls = {r.name: r.newton_schulz(params_of[r.param_dtype or param_dtype]) for r in rows if r.newton_schulz}
    if not calls:
        return {}
    dtypes = {dt for _, dt in calls.values()}
    matmul = {dt: matmul_throughput(dt, device) for dt in dtypes}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call, _ in calls.values():
        call()  # warm-up
    for _ in range(reps):
        for name, (call, _) in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    matmul = {dt: max(g, matmul_throughput(dt, device)) for dt, g in matmul.items()}
    return {**{name: (statistics.median(t), calls[name][1]) for name, t in times.items()}, "matmul": matmul}


def _version(distribution: str) -> str:
    """A peer's installed version, which the table's footer names."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class SparseRow(NamedTuple):
    """One implementation on the sparse workload."""

    name: str
    make: Callable[[list[torch.nn.Parameter]], Any]
    dense: bool = False  # fed the gradient made dense (every row, zeros included)


def sparse_candidates() -> list[SparseRow]:
    """The sparse table's implementations: ours (fused and reference) and torch's two ways (the
    same lr; weight decay 1e-2 where there is one: SparseAdam has none)."""
    return [
        SparseRow("torch AdamW fused (dense)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
                  dense=True),
        SparseRow("torch SparseAdam", lambda ps: torch.optim.SparseAdam(ps, lr=1e-3)),
        SparseRow("ours SparseAdamW default", lambda ps: SparseAdamW(ps, lr=1e-3, weight_decay=1e-2)),
        SparseRow("ours SparseAdamW reference", lambda ps: SparseAdamW(ps, lr=1e-3, weight_decay=1e-2, fused=False)),
    ]


def sparse_grads(rows: int, dim: int, touched: int, count: int, device: torch.device,
                 gen: torch.Generator) -> list[torch.Tensor]:
    """``count`` gradients touching ``touched`` random rows each, as an embedding's backward gives
    them: one entry per lookup, in lookup order, a tenth of the rows looked up twice (so every
    optimizer must sum repeated rows: coalesce)."""
    grads = []
    for _ in range(count):
        index = torch.randperm(rows, generator=gen)[:touched]
        index = torch.cat([index, index[:max(1, touched // 10)]])
        index = index[torch.randperm(index.numel(), generator=gen)]
        values = torch.randn(index.numel(), dim, generator=gen) * 1e-3
        grads.append(torch.sparse_coo_tensor(index[None], values, (rows, dim), check_invariants=False).to(device))
    return grads


def run_sparse(model: str, device_name: str, reps: int, only: list[str] | None) -> dict[str, Any]:
    """The sparse table: an embedding of ``SPARSE_MODELS[model]``, one shared parameter, each step
    a new gradient of the touched rows; ms per step, the bytes a step must move at least (28 per
    touched element: read p, g, m, v, write p, m, v; 28 per element for the dense step), GB/s and
    its fraction of the in-place bandwidth, and each row's ratio to dense fused AdamW and to
    SparseAdam, timed in interleaved rounds (all states fit at once on the CPU)."""
    device = torch.device(device_name)
    rows, dim, fraction = SPARSE_MODELS[model]
    touched = max(1, round(rows * fraction))
    n = rows * dim
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(rows, dim, generator=gen) * 0.02).to(device))
    grads = sparse_grads(rows, dim, touched, 4, device, gen)
    chosen = [r for r in sparse_candidates() if not only or any(o.lower() in r.name.lower() for o in only)]
    dense_grad = grads[0].to_dense() if any(r.dense for r in chosen) else None
    bw = bandwidth(min(n, 1 << 26), device)
    steps: dict[str, Callable[[], Any]] = {}
    failed: dict[str, str] = {}
    for row in chosen:
        turn = iter(range(1 << 62))

        def step(opt: Any = None, row: SparseRow = row, turn: Any = turn) -> None:
            param.grad = dense_grad if row.dense else grads[next(turn) % len(grads)]
            opt.step()

        try:
            opt = row.make([param])
            steps[row.name] = lambda step=step, opt=opt: step(opt)
            for _ in range(2):  # state allocation, the C loop's compile: untimed
                steps[row.name]()
        except (RuntimeError, TypeError, ValueError) as err:
            failed[row.name] = str(err).strip().splitlines()[0][:60]
            steps.pop(row.name, None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, s in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            s()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    param.grad = None
    medians = {name: statistics.median(t) for name, t in times.items()}
    dense_ms, sparse_ms = medians.get("torch AdamW fused (dense)"), medians.get("torch SparseAdam")
    best = max(bw.values())
    print(f"{model}: {rows:,} x {dim} fp32 table ({n / 1e6:.1f} M params), {touched:,} rows ({fraction:.0%}) touched a "
          f"step, {device}, torch {torch.__version__}; measured bandwidth: copy {bw['copy']:.1f} GB/s, in-place "
          f"{bw['inplace']:.1f} GB/s; median of {reps}, interleaved")
    width = max([30, *map(len, medians)])
    print(f"{'implementation':{width}s} {'ms/step':>9s} {'MB moved':>9s} {'GB/s':>7s} {'of bw':>6s} "
          f"{'/dense AdamW fused':>19s} {'/SparseAdam':>12s} {'dense fused / this':>19s}")
    out = []
    for name, ms in medians.items():
        moved = 28 * (n if next(r for r in chosen if r.name == name).dense else touched * dim)
        gbs = moved / ms / 1e6
        vs_dense = ms / dense_ms if dense_ms else None
        vs_sparse = ms / sparse_ms if sparse_ms else None
        speedup = dense_ms / ms if dense_ms else None
        print(f"{name:{width}s} {ms:9.2f} {moved / 1e6:9.1f} {gbs:7.1f} {gbs / best:6.0%} {_ratio(vs_dense):>19s} "
              f"{_ratio(vs_sparse):>12s} {_ratio(speedup):>19s}")
        out.append({"name": name, "ms": ms, "bytes_moved": moved, "gb_per_s": gbs, "fraction_of_bandwidth": gbs / best,
                    "vs_torch_fused": vs_dense, "vs_sparse_adam": vs_sparse, "speedup_vs_dense": speedup})
    for name, why in failed.items():
        print(f"{name:{width}s} {'n/a':>9s}  {why}")
    return {"kind": "sparse", "model": model, "table_rows": rows, "dim": dim, "touched_rows": touched, "params": n,
            "dtype": "fp32", "device": str(device), "machine": machine(device),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "bandwidth_gb_per_s": bw,
            "reps": reps, "interleaved": True, "rows": out, "unavailable": failed}


def _sparse_markdown(r: dict[str, Any]) -> list[str]:
    """The README's table of a sparse run."""
    lines = [f"`{r['model']}` ({r['table_rows']:,} x {r['dim']} fp32 embedding, {r['touched_rows']:,} rows touched "
             "a step):",
             "", "| implementation | ms/step | of bandwidth | / dense AdamW fused | / SparseAdam |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['name']} | {row['ms']:.2f} | {row['fraction_of_bandwidth']:.0%} | "
              f"{_ratio(row['vs_torch_fused'])} | {_ratio(row['vs_sparse_adam'])} |" for row in r["rows"]]
    return lines + [""]


def machine(device: torch.device) -> str:
    """The hardware in words: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def markdown(results: list[dict[str, Any]]) -> str:
    """The Markdown table of one or more runs (``run``'s results, or its JSON), with the date, the
    machine, the versions of the peers and the command that measured them; with ``--compile``, a
    column of each compiled row's ratio to the same implementation in eager mode."""
    lines = []
    for r in results:
        if r.get("kind") == "sparse":
            lines += _sparse_markdown(r)
            continue
        eager = any(row.get("vs_eager") is not None for row in r["rows"])
        muon = "muon" in r  # Note [the Muon rows]: its ratio, and the iteration's throughput
        lines += [f"`{r['model']}` ({r['tensors']} tensors, {r['params'] / 1e6:.1f} M params, {r['dtype']}):", "",
                  "| implementation | ms/step | B/param | state B/param | of bandwidth | / torch fused |"
                  + (" / eager |" if eager else "")
                  + (" / torch Muon + AdamW | NS ms | NS GFLOP/s | of matmul |" if muon else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if eager else "") + ("---:|" * 4 if muon else "")]
        lines += [f"| {row['name']} | {row['ms']:.2f} | {_bytes(row['bytes_per_param'])} | "
                  f"{_held(row.get('state_bytes_per_param'))} | {row['fraction_of_bandwidth']:.0%} "
                  f"| {_ratio(row['vs_torch_fused'])} |" + (f" {_ratio(row.get('vs_eager'))} |" if eager else "")
                  + (f" {_ratio(row.get('vs_torch_muon'))} | {_number(row.get('ns_ms'), '.2f')} | "
                     f"{_number(row.get('ns_gflop_per_s'), '.0f')} | {_number(row.get('fraction_of_matmul'), '.0%')} |"
                     if muon else "")
                  for row in r["rows"]]
        if muon:
            m = r["muon"]
            lines += ["", f"Newton-Schulz ({m['ns_steps']} steps) on the {m['matrices']} hidden matrices: "
                      f"{m['ns_gflop_per_step']:.1f} GFLOP a step. A {m['matmul_size']} x {m['matmul_size']} product "
                      "measured in the same run: " + ", ".join(f"{dt} {g:.0f} GFLOP/s"
                                                               for dt, g in m["matmul_gflop_per_s"].items()) + "."]
        if r.get("skipped"):
            lines += ["", "Skipped: " + "; ".join(f"{name} ({why})" for name, why in r["skipped"].items()) + "."]
        if r.get("unavailable"):
            lines += ["", "Failed here: " + "; ".join(f"{name} ({why})" for name, why in r["unavailable"].items())
                      + "."]
        lines.append("")
    first = results[0]
    versions = {k: v for r in results for k, v in r.get("versions", {}).items()}
    lines.append(
        f"Measured {first['date']} on {first['machine']} ({first['device']}, torch {first['torch']}"
        + "".join(f", {k} {v}" for k, v in versions.items())
        + f") with `{first.get('command', 'python -m optimizer bench')}`; medians of {first['reps']} steps"
        + (", interleaved." if first["interleaved"] else ".")
    )
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _number(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _bytes(x: float) -> str:
    """Bytes moved per parameter: 28, 20, 16.1 (8-bit codes with their scales)."""
    return f"{x:.3g}"


def _held(x: float | None) -> str:
    """State bytes per parameter (absent from results written before that column)."""
    return "-" if x is None else f"{x:.2f}"
