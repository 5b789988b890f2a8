"""SparseAdamW (optimizer/sparse_adamw.py): lazy moments and exact lazy decoupled weight decay
for sparse gradients.

The reference is tied to a float64 transcription of the algorithm written here (the product of
the scheduled decay factors each row owes, kept as a plain list of factors) at every step; the
C loop and the Triton kernel (Triton's interpreter without a GPU) to the reference at every
step; the whole to our AdamW where every row is touched at every step, and to
torch.optim.SparseAdam with no weight decay. Then the torch.optim contract: checkpoints,
GradScaler, closures, errors that change nothing, no temporary of the table's size."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import shutil
import subprocess

import pytest
import torch
from helpers import assert_same_nested, assert_unchanged, snapshot

from optimizer import AdamW, SparseAdamW, _dispatch, _fused_cpu
from optimizer.sparse_adamw import _SPARSE_KERNEL, LAZY_KEYS, sparse_adamw

HAS_CC = shutil.which("cc") is not None
SHAPES = [(30, 4), (25,)]  # a table (rows of 4) and a 1-D parameter (rows of one element)


def sparse(rows, values, shape):
    """A row-sparse COO gradient, as nn.Embedding(sparse=True) gives: rows in any order, repeats allowed."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    return torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True)


def random_grad(shape, gen, n, dtype=torch.float32, scale=1.0):
    rows = torch.randint(0, shape[0], (n,), generator=gen)
    return sparse(rows, (torch.randn((n, *shape[1:]), generator=gen, dtype=torch.float64) * scale).to(dtype), shape)


def every_row(values):
    return sparse(torch.arange(values.shape[0]), values, values.shape)


def materialized(opt, p):
    """The weights with every owed decay applied, in float64, read without changing anything."""
    state = opt.state.get(p, {})
    if LAZY_KEYS[0] not in state:
        return p.detach().double()
    owed = torch.exp(float(state["decay_log"]) - state["row_decay_log"])
    return p.detach().double() * owed.view(-1, *(1,) * (p.dim() - 1))


# ---------------------------------------------------------------------------------------------
# the float64 transcription: lazy Adam over the rows of each gradient, each row multiplied, when
# touched, by the product of the factors 1 - lr_s wd of every step since it last was
# ---------------------------------------------------------------------------------------------

class Transcription:
    def __init__(self, p, *, betas, eps, weight_decay, correct_bias=True, maximize=False):
        self.p = p.detach().double().clone()
        self.m, self.v = torch.zeros_like(self.p), torch.zeros_like(self.p)
        self.b1, self.b2 = betas
        self.eps, self.wd, self.correct_bias, self.maximize = eps, weight_decay, correct_bias, maximize
        self.factors = []  # 1 - lr_s wd of each of the parameter's steps
        self.paid = [0] * self.p.shape[0]  # the steps whose factors each row has paid

    def step(self, grad, lr):
        """``grad``: sparse (its rows, duplicates summed) or dense (every row), or None (no step)."""
        if grad is None:
            return
        self.factors.append(1 - lr * self.wd)
        t = len(self.factors)
        dense = grad.to_dense().double() if grad.layout != torch.strided else grad.double()
        rows = sorted(set(grad.coalesce().indices()[0].tolist())) if grad.layout != torch.strided \
            else range(self.p.shape[0])
        for i in rows:
            self.p[i] = self.p[i] * math.prod(self.factors[self.paid[i]:t])
            self.paid[i] = t
            g = -dense[i] if self.maximize else dense[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1**t) if self.correct_bias else self.m[i]
            v_hat = self.v[i] / (1 - self.b2**t) if self.correct_bias else self.v[i]
            self.p[i] = self.p[i] - lr * m_hat / (torch.sqrt(v_hat) + self.eps)

    def weights(self):
        """Every row with all it owes paid."""
        out = self.p.clone()
        for i in range(out.shape[0]):
            out[i] = out[i] * math.prod(self.factors[self.paid[i]:])
        return out


CONFIGS = [
    dict(weight_decay=0.1),
    dict(weight_decay=0.05, correct_bias=False),
    dict(weight_decay=0.2, maximize=True, betas=(0.8, 0.99), eps=1e-6),
    dict(weight_decay=0.1, tensor_lr=True),
]
LRS = [1e-2, 3e-2, 5e-3, 2e-2, 1e-2, 4e-2, 1e-3, 2e-2]  # a schedule that changes every step


def hyper(cfg):
    out = dict(betas=(0.9, 0.999), eps=1e-8, correct_bias=True, maximize=False)
    out.update({k: v for k, v in cfg.items() if k != "tensor_lr"})
    return out


def set_lr(opt, lr, cfg):
    opt.param_groups[0]["lr"] = torch.tensor(lr, dtype=torch.float64) if cfg.get("tensor_lr") else lr


def grads_of_step(step, shape, gen, dtype):
    """Most steps a few rows (repeats included); step 3 an empty gradient (the rows owe one more
    factor), step 5 none at all (no step for this parameter)."""
    if step == 3:
        return sparse(torch.zeros(0, dtype=torch.int64), torch.zeros((0, *shape[1:]), dtype=dtype), shape)
    if step == 5:
        return None
    return random_grad(shape, gen, 6, dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_reference_matches_float64_transcription_every_step(cfg):
    """The reference in float64 is the transcription: the touched rows' moments and weights, and
    the decay every untouched row owes, at every step of a changing lr (rows untouched for many
    steps, an empty gradient, a step without a gradient)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    kw = hyper(cfg)
    expected = [Transcription(p, **kw) for p in params]
    opt = SparseAdamW(params, lr=LRS[0], foreach=False, fused=False, **kw)
    for step, lr in enumerate(LRS):
        set_lr(opt, lr, cfg)
        for p, e in zip(params, expected):
            p.grad = grads_of_step(step, p.shape, gen, torch.float64)
            e.step(p.grad, lr)
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(materialized(opt, p), e.weights(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], e.m, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], e.v, rtol=1e-10, atol=1e-16)
            assert opt.state[p]["step"].item() == len(e.factors)
            assert math.isclose(float(opt.state[p]["decay_log"]), math.log(math.prod(e.factors)), rel_tol=1e-12)
    weights = [e.weights() for e in expected]
    opt.flush()  # pays every row: the weights themselves are the transcription's now
    for p, w in zip(params, weights):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
        assert not set(LAZY_KEYS) & set(opt.state[p])


def test_a_row_untouched_for_k_steps_pays_the_product_of_the_factors_used():
    """With moments that cannot move it (lr wd only), a row's weight is exactly its start times the
    product of the scheduled factors, in float64, however long it waited."""
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.5, fused=False)
    lrs = [0.1, 0.3, 0.05, 0.2, 0.15, 0.01]
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        p.grad = sparse([0], torch.zeros(1, 3, dtype=torch.float64), p.shape)  # row 0 every step, the rest never
        opt.step()
    assert torch.equal(p[1:], torch.ones(3, 3, dtype=torch.float64))  # unpaid: untouched
    opt.flush(p, [2])
    product = math.prod(1 - lr * 0.5 for lr in lrs)
    torch.testing.assert_close(p[2], torch.full((3,), product, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(p[0], torch.full((3,), product, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(p[1], torch.ones(3, dtype=torch.float64)) and torch.equal(p[3], p[1])
    opt.flush()
    torch.testing.assert_close(p.detach(), torch.full((4, 3), product, dtype=torch.float64), rtol=1e-14, atol=0)


# ----- against AdamW and torch.optim.SparseAdam -----------------------------------------------


class AdamWCLoop(AdamW):
    """AdamW on its C loop whatever the dtype (AdamW sends fp32/fp64 with correct_bias to torch's
    own fused kernel, which rounds v's update differently: equal to rounding, not bit for bit)."""

    backends = dataclasses.replace(AdamW.backends, torch=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("cfg", [dict(), dict(correct_bias=False, maximize=True)], ids=["default", "variant"])
def test_every_row_at_every_step_is_adamw_bit_for_bit(backend, dtype, cfg):
    """Touching every row at every step, SparseAdamW computes exactly AdamW, backend for backend
    (the reference against AdamW's reference, the C loop against AdamW's C loop), with a changing
    lr: the lazy factor of a row touched at the last step is 1 - lr wd itself. AdamW's default
    (torch's kernel for fp32/fp64) is met to float32 rounding."""
    if backend == "fused" and not HAS_CC:
        pytest.skip("needs a C compiler")
    kw = dict(foreach=False, fused=False) if backend == "reference" else dict(fused=True)
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(13, 7, generator=gen, dtype=torch.float64).to(dtype)
    a, b, c = (torch.nn.Parameter(start.clone()) for _ in range(3))
    dense = (AdamW if backend == "reference" else AdamWCLoop)([a], lr=1e-2, weight_decay=0.1, **cfg, **kw)
    lazy = SparseAdamW([b], lr=1e-2, weight_decay=0.1, **cfg, **kw)
    default = AdamW([c], lr=1e-2, weight_decay=0.1, **cfg)
    for step, lr in enumerate(LRS[:5], 1):
        g = torch.randn(13, 7, generator=gen, dtype=torch.float64).to(dtype)
        for opt in (dense, lazy, default):
            opt.param_groups[0]["lr"] = lr
        a.grad, b.grad, c.grad = g.clone(), every_row(g.clone()), g.clone()
        for opt in (dense, lazy, default):
            opt.step()
        assert torch.equal(a, b)
        assert torch.equal(dense.state[a]["exp_avg"], lazy.state[b]["exp_avg"])
        assert torch.equal(dense.state[a]["exp_avg_sq"], lazy.state[b]["exp_avg_sq"])
        _close_to_reference(b, c, step, dtype)
    assert_same_nested(dense.state_dict()["state"], lazy.state_dict()["state"])


def _against_sparse_adam(eps_mode, backend):
    gen = torch.Generator().manual_seed(2)
    lr, betas, eps = 1e-2, (0.9, 0.999), (0.0 if eps_mode == "eps=0" else 1e-8)
    start = torch.randn(50, 8, generator=gen)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    theirs = torch.optim.SparseAdam([a], lr=lr, betas=betas)
    theirs.param_groups[0]["eps"] = eps  # (its constructor refuses 0)
    ours = SparseAdamW([b], lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                       **(dict(fused=False) if backend == "reference" else {}))
    worst = 0.0
    for t in range(1, 21):
        g = random_grad(a.shape, gen, 12, scale=1e-3)
        a.grad, b.grad = g.clone(), g.clone()
        if eps_mode == "eps shifted":  # SparseAdam adds eps to sqrt(v), we to sqrt(v / (1 - b2^t))
            theirs.param_groups[0]["eps"] = eps * math.sqrt(1 - betas[1] ** t)
        theirs.step()
        ours.step()
        # float32 rounding: a few ulps of each step (at most ~3 lr for Adam) and of each weight, per step
        tol = t * (2 ** -21 * 3 * lr + 2 ** -23 * a.detach().abs())
        worst = max(worst, ((a - b).abs() / tol).max().item())
        # moments: float32 rounding of values of the gradients' size (1e-3, squared 1e-6), some cancelling
        torch.testing.assert_close(ours.state[b]["exp_avg"], theirs.state[a]["exp_avg"], rtol=t * 2**-21,
                                   atol=t * 2**-22 * 1e-3)
        torch.testing.assert_close(ours.state[b]["exp_avg_sq"], theirs.state[a]["exp_avg_sq"], rtol=t * 2**-21,
                                   atol=t * 2**-22 * 1e-6)
        assert int(ours.state[b]["step"]) == theirs.state[a]["step"] == t
    return worst


@pytest.mark.parametrize("backend", ["reference", "default"])
@pytest.mark.parametrize("eps_mode", ["eps=0", "eps shifted"])
def test_without_weight_decay_it_is_sparse_adam_to_float32_rounding(eps_mode, backend):
    """weight_decay=0: torch.optim.SparseAdam (lazy moments, duplicates summed, the step counted
    per parameter), to float32 rounding at every step; not bit for bit, since SparseAdam rounds
    other operations (m + (1 - b1)(g - m) for AdamW's lerp, ...). Its eps sits on sqrt(v),
    ours on sqrt(v_hat) (Note [eps placement]): equal for eps=0, and for eps>0 when SparseAdam is
    given eps sqrt(1 - b2^t) at step t."""
    assert _against_sparse_adam(eps_mode, backend) <= 1.0


def test_with_sparse_adams_eps_as_it_is_only_the_eps_placement_differs():
    """The other side of the test above: with eps=1e-8 given to both as it is and small gradients,
    the difference is far beyond rounding (it is the eps placement, at early steps)."""
    assert _against_sparse_adam("eps as is", "reference") > 1e3


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_distinct_rows_in_any_order_are_not_coalesced_and_give_the_same_bits(backend):
    """Rows in the order an embedding's backward gives them: taken as they are when distinct (no
    sort, no copy of the values: the .grad itself goes to the backend), coalesced when repeated;
    either way the bits of a run on the coalesced gradients."""
    from optimizer.sparse_adamw import _coalesced

    kw = dict(fused=False) if backend == "reference" else {}
    gen = torch.Generator().manual_seed(15)
    start = torch.randn(40, 6, generator=gen)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    as_given, coalesced = SparseAdamW([a], lr=1e-2, **kw), SparseAdamW([b], lr=1e-2, **kw)
    for step in range(4):
        rows = torch.randperm(40, generator=gen)[:9] if step % 2 else torch.randint(0, 40, (15,), generator=gen)
        a.grad = sparse(rows, torch.randn(rows.numel(), 6, generator=gen), a.shape)
        b.grad = a.grad.coalesce()
        distinct = rows.unique().numel() == rows.numel()
        assert (_coalesced([a], [a.grad], str)[0] is a.grad) == distinct
        as_given.step()
        coalesced.step()
        assert torch.equal(a, b) and torch.equal(as_given.state[a]["exp_avg_sq"], coalesced.state[b]["exp_avg_sq"])


# ----- the fused backends against the reference --------------------------------------------


def _close_to_reference(b, a, step, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        # float32 math that rounds differently by an ulp can cross a rounding boundary of the
        # parameter's dtype: one ulp of that dtype per step at most
        s = torch.maximum(a.detach().abs(), b.detach().abs()).float()
        ulp = torch.nextafter(s.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() - s.to(dtype).float()
        assert ((a.float() - b.float()).abs() <= step * ulp.abs() + 1e-12).all()
    else:  # torch's CPU sqrt may be an ulp off the correctly rounded one the kernels compute
        torch.testing.assert_close(b, a)


def _run_against_reference(fused_kw, dtype, shapes, steps=5, n_rows=7):
    gen = torch.Generator().manual_seed(3)
    starts = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(s.clone()) for s in starts]
    new_params = [torch.nn.Parameter(s.clone()) for s in starts]
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3, "maximize": True}]  # noqa: E731
    ref = SparseAdamW(groups(ref_params), lr=2e-2, weight_decay=0.1, fused=False)
    new = SparseAdamW(groups(new_params), lr=2e-2, weight_decay=0.1, **fused_kw)
    for step in range(1, steps + 1):
        for opt in (ref, new):
            opt.param_groups[0]["lr"] = LRS[step]
        for a, b in zip(ref_params, new_params):
            a.grad = random_grad(a.shape, gen, n_rows, dtype)
            b.grad = a.grad.clone()
        ref.step()
        new.step()
        for a, b in zip(ref_params, new_params):
            _close_to_reference(b, a, step, dtype)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(new.state[b][key], ref.state[a][key], rtol=step * 2e-6, atol=1e-12)
            assert torch.equal(new.state[b]["row_decay_log"], ref.state[a]["row_decay_log"])
            assert torch.equal(new.state[b]["decay_log"], ref.state[a]["decay_log"])
            assert torch.equal(new.state[b]["step"], ref.state[a]["step"])
    return ref, new


C_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("dtype", C_DTYPES, ids=str)
def test_c_loop_matches_reference_every_step(dtype):
    from optimizer.sparse_adamw import route_rows

    fns = _fused_cpu.library(_SPARSE_KERNEL, strict=True)
    if (dtype, torch.float64 if dtype == torch.float64 else torch.float32) not in fns:
        pytest.skip(f"no {dtype} variant here (C without _Float16)")
    # a wide table (rows of 300: several vector lengths and a tail) and a 1-D parameter
    _, new = _run_against_reference(dict(fused=True), dtype, [(40, 300), (64,)], n_rows=9)
    for p, state in new.state.items():  # (and it was the C loop that ran)
        assert route_rows([p], [state["exp_avg"]], [state["exp_avg_sq"]], foreach=None, fused=True) == {"c": [0]}


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "single-threaded"])
def test_c_source_compiles_with_warnings_as_errors(openmp, tmp_path):
    """csrc/sparse_rows.c around AdamW's C body, every dtype variant (as tests/test_c_source.py
    compiles the other kernels)."""
    import ctypes

    text = _fused_cpu.source(_SPARSE_KERNEL)
    assert "void FN(int64_t n_tensors" in text and "exp(lazy[0] - logs[row])" in text
    for line in _SPARSE_KERNEL.body.strip().splitlines():
        assert line.strip() in text
    src, lib = tmp_path / "sparse.c", tmp_path / "sparse.so"
    src.write_text(text)
    cmd = ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
           *(["-fopenmp"] if openmp else []), str(src), "-o", str(lib), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = ctypes.CDLL(str(lib))
    assert hasattr(loaded, "sparse_adamw_float_float") and hasattr(loaded, "sparse_adamw_bf16_float")


# ----- Triton (its interpreter without a GPU) ----------------------------------------------


@pytest.fixture
def triton_on_this_device():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    added = device not in _dispatch.TRITON_DEVICES
    _dispatch.TRITON_DEVICES.add(device)
    yield device
    if added:
        _dispatch.TRITON_DEVICES.discard(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_kernel_matches_reference_every_step(dtype, triton_on_this_device, monkeypatch):
    from optimizer import _sparse_triton

    if triton_on_this_device == "cuda":
        pytest.skip("the CUDA run is the same test with CUDA tensors: run it where a GPU is")
    launches = []
    kernel = _sparse_triton._sparse_adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(_sparse_triton, "_sparse_adamw_kernel", Counting())
    # rows of 5 (4 x 512 tiles), a 1-D parameter of 2100 (two programs of 2048 one-element rows),
    # rows of 2050 (wider than a tile: two column blocks)
    _run_against_reference(dict(fused=True), dtype, [(30, 5), (2100,), (4, 2050)], steps=3, n_rows=5)
    assert len(launches) == 3 * 3  # one per tensor and step
    assert _sparse_triton.launch_shape(5) == (256, 8) and _sparse_triton.launch_shape(2050) == (1, 2048)


TRITON_COMPILE = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optimizer import _sparse_triton as ST
kernel = ST._sparse_adamw_kernel
types = {"p_ptr": "*fp32", "g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "rows_ptr": "*i64",
         "logs_ptr": "*fp64", "n_rows": "i32", "row_len": "i32", "log_before": "fp64", "log_after": "fp64",
         "decay_now": "fp64"}
out = []
for P in (tl.float32, tl.bfloat16):
    constexprs = dict(P=P, ROWS=2, COLS=1024, MAXIMIZE=False)
    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "fp32") for n in names}
    if P is tl.bfloat16:
        signature.update(p_ptr="*bf16", g_ptr="*bf16")
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": ST.NUM_WARPS, "enable_fp_fusion": False})
    except Exception as err:
        if "backend" in str(err).lower() or "ptxas" in str(err).lower():  # a Triton without its CUDA compiler
            print("SKIP", type(err).__name__, err)
            sys.exit(0)
        raise
    out.append(len(compiled.asm["ptx"]))
print("OK", out)
"""


def test_triton_kernel_compiles_for_a_gpu():
    """Compiled for an H100 (sm_90; Triton's own compiler in a process without the interpreter,
    no GPU needed): the float64 decay factor (exp) and the float32 update of fp32 and bf16 rows."""
    pytest.importorskip("triton")
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRITON_COMPILE], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.stdout.startswith("OK")


# ----- checkpoints ---------------------------------------------------------------------------


def _train(opt, params, gen, steps, lrs=LRS):
    for step in range(steps):
        opt.param_groups[0]["lr"] = lrs[step % len(lrs)]
        for p in params:
            p.grad = random_grad(p.shape, gen, 5) if p.dim() else None
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_state_dict_pays_the_debt_and_round_trips_bit_identically(backend):
    kw = dict(fused=False) if backend == "reference" else {}
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = SparseAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
    _train(opt, params, gen, 4)
    assert all(LAZY_KEYS[0] in opt.state[p] for p in params)
    expected = [materialized(opt, p).float() for p in params]
    saved = opt.state_dict()
    for p, e in zip(params, expected):  # the weights read after state_dict() are the decayed ones
        torch.testing.assert_close(p.detach(), e, rtol=2**-23, atol=0)
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's state, torch's names
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = SparseAdamW(copies, lr=5.0, weight_decay=0.0, **kw)
    other.load_state_dict(loaded)
    assert_same_nested(other.state_dict(), opt.state_dict())  # save, load, save: the same dict


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_a_resumed_run_equals_an_uninterrupted_one(backend):
    """Bit for bit against a run that saved at the same step (saving pays the debt, in one rounding);
    to float32 rounding against one that never saved."""
    kw = dict(fused=False) if backend == "reference" else {}
    start = [torch.randn(s, generator=torch.Generator().manual_seed(5)) for s in SHAPES]

    def run(save_at=None, resume=False):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = SparseAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
        gen = torch.Generator().manual_seed(6)
        for step in range(8):
            if step == save_at:
                buffer = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
                if resume:  # a new process: new parameters, a new optimizer, the checkpoint
                    buffer.seek(0)
                    ckpt = torch.load(buffer, weights_only=True)
                    params = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
                    opt = SparseAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
                    opt.load_state_dict(ckpt["opt"])
            opt.param_groups[0]["lr"] = LRS[step]
            for p in params:
                p.grad = random_grad(p.shape, gen, 5)
            opt.step()
        opt.flush()
        return [p.detach() for p in params], opt

    saved, opt_saved = run(save_at=4)
    resumed, opt_resumed = run(save_at=4, resume=True)
    never, _ = run()
    for a, b, c in zip(saved, resumed, never):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=2e-6, atol=1e-7)
    assert_same_nested(opt_saved.state_dict(), opt_resumed.state_dict())


def test_checkpoints_of_torch_sparse_adam_and_adamw_load():
    """The saved state is torch's (step, exp_avg, exp_avg_sq): SparseAdam's checkpoints load here
    (its groups have no weight_decay: the default fills it) and ours load into AdamW."""
    p = torch.nn.Parameter(torch.randn(10, 3))
    theirs = torch.optim.SparseAdam([p], lr=1e-2)
    p.grad = random_grad(p.shape, torch.Generator().manual_seed(7), 4)
    theirs.step()
    q = torch.nn.Parameter(p.detach().clone())
    ours = SparseAdamW([q], lr=1e-3)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["weight_decay"] == 1e-2
    assert torch.equal(ours.state[q]["exp_avg"], theirs.state[p]["exp_avg"]) and int(ours.state[q]["step"]) == 1
    q.grad = p.grad.clone()
    ours.step()
    AdamW([torch.nn.Parameter(q.detach().clone())]).load_state_dict(ours.state_dict())


# ----- a mixed model: dense parameters are AdamW's -------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "foreach", "default"])
def test_dense_parameters_are_updated_exactly_as_adamw_does(backend):
    kw = {"reference": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "default": {}}[backend]
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 6, sparse=True), torch.nn.Linear(6, 5))
    twin = copy.deepcopy(model)
    opt = SparseAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    dense = AdamW(list(twin[1].parameters()), lr=1e-2, weight_decay=0.1, **kw)
    for _ in range(4):
        x = torch.randint(0, 40, (16,))
        for m in (model, twin):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        opt.step()
        dense.step()
        for a, b in zip(model[1].parameters(), twin[1].parameters()):
            assert torch.equal(a, b)
        with torch.no_grad():  # the same embedding for the next step's gradients
            twin[0].weight.copy_(model[0].weight)
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq", *LAZY_KEYS}


def test_a_parameter_switching_to_a_dense_gradient_pays_its_debt_first():
    """A dense gradient is every row touched: the debt is paid, then AdamW's step (the
    transcription sees a dense gradient as a gradient of every row)."""
    gen = torch.Generator().manual_seed(9)
    p = torch.nn.Parameter(torch.randn(12, 3, generator=gen, dtype=torch.float64))
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.1, fused=False)
    expected = Transcription(p, **hyper(dict(weight_decay=0.1)))
    for step, lr in enumerate(LRS[:6]):
        opt.param_groups[0]["lr"] = lr
        dense = step in (2, 5)
        p.grad = torch.randn(12, 3, generator=gen, dtype=torch.float64) if dense else random_grad(
            p.shape, gen, 3, torch.float64)
        expected.step(p.grad, lr)
        opt.step()
        torch.testing.assert_close(materialized(opt, p), expected.weights(), rtol=1e-10, atol=1e-12)
        assert (LAZY_KEYS[0] in opt.state[p]) == (not dense)


def test_create_optimizer_gives_sparse_adamw_to_a_model_with_sparse_embeddings():
    from optimizer.factory import create_optimizer

    model = torch.nn.Sequential(torch.nn.EmbeddingBag(30, 4, sparse=True, mode="sum"), torch.nn.Linear(4, 2))
    opt = create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    assert type(opt) is SparseAdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    losses = []
    x = torch.randint(0, 30, (8, 3))
    for _ in range(20):
        opt.zero_grad()
        loss = model(x).sub(1).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert type(create_optimizer(torch.nn.Linear(4, 2), "adamw")) is AdamW
    with pytest.raises(ValueError, match="state_dtype"):
        create_optimizer(model, "adamw", state_dtype="bf16")


# ----- the contract ---------------------------------------------------------------------------


def _model_and_batches(seed=10):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 6, sparse=True), torch.nn.Linear(6, 5))
    gen = torch.Generator().manual_seed(seed)
    return model, [torch.randint(0, 40, (16,), generator=gen) for _ in range(4)]


def test_gradscaler_unscales_and_skips_on_inf():
    model, batches = _model_and_batches()
    twin = copy.deepcopy(model)
    opt = SparseAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref = SparseAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x in batches:
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        twin(x).pow(2).mean().backward()
        scaler.step(opt)
        scaler.update()
        ref.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)  # a power-of-2 scale divides exactly
    opt.zero_grad()
    scaler.scale(model(batches[0]).pow(2).mean()).backward()
    model[0].weight.grad._values()[0, 0] = float("inf")
    snap = snapshot(opt)
    scaler.step(opt)
    assert_unchanged(opt, snap)  # nothing moved, not even the step counts or the decay logs
    scaler.update()
    assert scaler.get_scale() < 2.0**12


def test_closure_is_called_and_its_loss_returned():
    model, batches = _model_and_batches()
    twin = copy.deepcopy(model)
    opt = SparseAdamW(model.parameters(), lr=1e-2)
    ref = SparseAdamW(twin.parameters(), lr=1e-2)
    for x in batches:
        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        ref.zero_grad()
        expected = twin(x).pow(2).mean()
        expected.backward()
        ref.step()
        assert torch.equal(loss, expected)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_functional_entry_is_the_class_step():
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(20, 3, generator=gen)
    a, b = torch.nn.Parameter(start.clone()), start.clone()
    opt = SparseAdamW([a], lr=1e-2, weight_decay=0.1, maximize=True)
    m, v, step = torch.zeros_like(b), torch.zeros_like(b), torch.tensor(0.0)
    log, logs = torch.zeros((), dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    for lr in LRS[:4]:
        g = random_grad(a.shape, gen, 6)
        a.grad = g
        opt.param_groups[0]["lr"] = lr
        opt.step()
        sparse_adamw([b], [g], [m], [v], [step], [log], [logs], lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1, maximize=True)
        assert torch.equal(a.detach(), b) and torch.equal(opt.state[a]["exp_avg"], m)
        assert torch.equal(opt.state[a]["row_decay_log"], logs) and torch.equal(opt.state[a]["decay_log"], log)
    with pytest.raises(ValueError, match=r"Invalid row_decay_logs: 0 tensors for 1 params"):
        sparse_adamw([b], [g], [m], [v], [step], [log], [], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1)
    with pytest.raises(RuntimeError, match=r"params\[0\] \(shape \(20, 3\)\) has a torch.strided gradient"):
        sparse_adamw([b], [g.to_dense()], [m], [v], [step], [log], [logs], lr=1e-2, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.1)


BAD_ARGS = [
    (dict(lr=-1e-3), ValueError, "lr=-0.001"),
    (dict(lr=float("nan")), ValueError, "lr=nan"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0: 1.0"),
    (dict(eps=-1e-8), ValueError, "epsilon value: -1e-08"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay value: -0.1"),
    (dict(lr=2.0, weight_decay=0.5), ValueError, r"Invalid lr \* weight_decay: 2 \* 0.5 = 1"),
    (dict(correct_bias=None), ValueError, "Invalid correct_bias: None"),
    (dict(foreach=True, fused=True), ValueError, "foreach=True and fused=True"),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD_ARGS, ids=[str(b[0]) for b in BAD_ARGS])
def test_bad_arguments_raise_naming_the_argument_and_value(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        SparseAdamW([torch.nn.Parameter(torch.randn(3, 2))], **kwargs)


def _grad_data(p, value):
    """``p.grad.data = value`` skips the checks of ``p.grad = ...``, as a buggy hook or kernel could."""
    p.grad = sparse([0], torch.ones(1, *p.shape[1:]), p.shape)
    p.grad.data = value


BAD_GRADS = {  # the last group's parameter (8, 2) gets: (what, the words of the error)
    "element-sparse": (lambda p: setattr(p, "grad", torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]),
                                                                            torch.ones(2), p.shape)), "sparse_dim=2"),
    "row out of range": (lambda p: setattr(p, "grad", torch.sparse_coo_tensor(
        torch.tensor([[0, 8]]), torch.ones(2, 2), p.shape, check_invariants=False)), r"row index 8 outside \[0, 8\)"),
    "negative row": (lambda p: setattr(p, "grad", torch.sparse_coo_tensor(
        torch.tensor([[-1, 3]]), torch.ones(2, 2), p.shape, check_invariants=False)), r"row index -1 outside"),
    "unsorted but marked coalesced": (lambda p: setattr(p, "grad", torch.sparse_coo_tensor(
        torch.tensor([[3, 1]]), torch.ones(2, 2), p.shape, is_coalesced=True, check_invariants=False)),
        "marked coalesced whose row indices are not sorted"),
    "shape": (lambda p: _grad_data(p, sparse([0], torch.ones(1, 3), (8, 3))),
              r"sparse gradient of shape \(8, 3\).*expected shape \(8, 2\)"),
    "dtype": (lambda p: _grad_data(p, sparse([0], torch.ones(1, 2, dtype=torch.float64), (8, 2))),
              "torch.float64 on cpu; expected shape"),
    "lr * weight_decay": (None, r"lr \* weight_decay: 4 \* 0.5 = 2"),
}


@pytest.mark.parametrize("backend", ["reference", "default"])
@pytest.mark.parametrize("case", list(BAD_GRADS))
def test_a_step_that_raises_changes_nothing(case, backend):
    """The bad input in the second group: the first (sparse and dense parameters, with state
    and owed decay) is checked and planned, and nothing of it changes."""
    kw = dict(fused=False) if backend == "reference" else {}
    make, words = BAD_GRADS[case]
    emb, lin = torch.nn.Parameter(torch.randn(10, 2)), torch.nn.Parameter(torch.randn(3, 2))
    bad = torch.nn.Parameter(torch.randn(8, 2))
    opt = SparseAdamW([{"params": [emb, lin]}, {"params": [bad]}], lr=1e-2, weight_decay=0.1, **kw)
    gen = torch.Generator().manual_seed(12)
    for _ in range(2):
        emb.grad, lin.grad = random_grad(emb.shape, gen, 3), torch.randn(3, 2)
        bad.grad = random_grad(bad.shape, gen, 2)
        opt.step()
    emb.grad, lin.grad = random_grad(emb.shape, gen, 3), torch.randn(3, 2)
    if make is None:
        opt.param_groups[1]["lr"] = 4.0
        opt.param_groups[1]["weight_decay"] = 0.5
    else:
        make(bad)
    snap = snapshot(opt)
    with pytest.raises((RuntimeError, ValueError), match=words):
        opt.step()
    assert_unchanged(opt, snap)


def test_the_functional_entry_refuses_other_layouts():
    """(A CSR gradient cannot be assigned to a parameter's .grad; the functional entry can be given one.)"""
    p, m, v = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match=r"params\[0\] \(shape \(4, 2\)\) has a torch.sparse_csr gradient"):
        sparse_adamw([p], [torch.ones(4, 2).to_sparse_csr()], [m], [v], [torch.tensor(0.0)],
                     [torch.zeros((), dtype=torch.float64)], [torch.zeros(4, dtype=torch.float64)], lr=1e-2,
                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def test_complex_parameters_with_sparse_gradients_are_refused_and_dense_ones_taken():
    p = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.complex64))
    opt = SparseAdamW([p], lr=1e-2)
    p.grad = torch.randn(4, 2, dtype=torch.complex64)
    opt.step()  # AdamW's path
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2, dtype=torch.complex64), (4, 2))
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"parameter 0 of group 0 \(shape \(4, 2\)\) is torch.complex64 "
                       r"with a sparse"):
        opt.step()
    assert_unchanged(opt, snap)


def test_flush_arguments_are_checked():
    p, q = torch.nn.Parameter(torch.randn(5, 2)), torch.nn.Parameter(torch.randn(5, 2))
    opt = SparseAdamW([p], lr=1e-2)
    with pytest.raises(ValueError, match="Invalid rows: give the parameter"):
        opt.flush(rows=[1])
    with pytest.raises(ValueError, match=r"Invalid param: Parameter of shape \(5, 2\) is not a parameter"):
        opt.flush(q)
    p.grad = sparse([0], torch.ones(1, 2), p.shape)
    opt.step()
    with pytest.raises(ValueError, match="Invalid rows: row 7 of a parameter with 5 rows"):
        opt.flush(p, [1, 7])
    with pytest.raises(ValueError, match="Invalid rows: expected integer row indices, got dtype torch.float32"):
        opt.flush(p, torch.tensor([1.0]))
    before = p.detach().clone()
    opt.flush(p, torch.tensor([-1, 4, 1]))  # negative rows count from the end; repeats are paid once
    factor = 1 - 1e-2 * 1e-2
    torch.testing.assert_close(p[[1, 4]], before[[1, 4]] * factor, rtol=2**-23, atol=0)
    assert torch.equal(p[[0, 2, 3]], before[[0, 2, 3]])


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_no_temporary_of_the_tables_size_inside_step(backend):
    """Every tensor a step allocates (seen by a dispatch mode: each aten op's outputs that are new
    memory) is a few rows, far below the table (here 1/20 of its rows are touched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.layout == torch.strided}
            for t in _tensors(out):
                for part in ((t._indices(), t._values()) if t.layout == torch.sparse_coo else (t,)):
                    if part.untyped_storage().data_ptr() not in inputs:
                        self.largest = max(self.largest, part.untyped_storage().nbytes())
            return out

    kw = dict(fused=False) if backend == "reference" else {}
    table = torch.nn.Parameter(torch.randn(2000, 64))
    opt = SparseAdamW([table], lr=1e-2, weight_decay=0.1, **kw)
    gen = torch.Generator().manual_seed(13)
    table.grad = random_grad(table.shape, gen, 100)
    opt.step()  # creates the state (the moments are state, not temporaries)
    table.grad = random_grad(table.shape, gen, 100)
    mode = Allocations()
    with mode:
        opt.step()
    table_bytes = table.numel() * table.element_size()
    assert 0 < mode.largest <= 100 * 64 * 8  # the touched rows (float64 at most), not the table
    assert mode.largest < table_bytes / 10


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def test_deepcopy_keeps_the_debt_and_continues_identically():
    gen = torch.Generator().manual_seed(14)
    p = torch.nn.Parameter(torch.randn(15, 2, generator=gen))
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.1)
    _train(opt, [p], gen, 3)
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    for _ in range(2):
        g = random_grad(p.shape, gen, 4)
        p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
    assert torch.equal(p, q) and torch.equal(opt.state[p]["row_decay_log"], twin.state[q]["row_decay_log"])
