"""A step that raises changes nothing (Note [two-phase step]), whatever the backend: every
value that could make a step fail midway is injected into the *last* group of an optimizer
(so that a step checking as it goes would already have updated the first), and parameters,
gradients and state must be bit-identical afterwards. Then the C loop's own failure modes
(Note [fused CPU]): they warn once and fall back, or raise before anything changed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from helpers import BACKENDS, assert_unchanged, snapshot
from optim_table import OPTIMIZERS, TABLE, hyper, ids

from optimizer import _fused_cpu


def two_groups(info, backend, **last_group):
    """An optimizer with state in two groups, and fresh gradients on every parameter."""
    torch.manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    last = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(2))]
    opt = info.cls([{"params": first}, {"params": last, **last_group}], weight_decay=0.1, **BACKENDS[backend])
    for _ in range(2):
        for p in first + last:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in first + last:
        p.grad = torch.randn_like(p)
    return opt, last


def _set(group, **values):
    group.update(values)


def _grad_data(p, value):
    p.grad.data = value  # .data skips the checks of `p.grad = ...`, as a buggy hook or kernel could


def _retype(p, dtype):
    p.requires_grad_(False)  # (integer tensors cannot require gradients)
    p.data = torch.zeros(p.shape, dtype=dtype)


def _state(opt, p, key, value):
    opt.state[p][key] = value


# name -> (inject(opt, last_params), exception, words of the message, the rows it applies to: None
# for all, else a test of the row); each row's own bad settings are its bad_step_settings
INJECTIONS = {
    "tensor betas": (lambda o, ps: _set(o.param_groups[-1], betas=(0.9, torch.tensor(0.99))), ValueError,
                     "tensor betas", lambda info: "betas" in hyper({}, info)),
    "nan lr": (lambda o, ps: _set(o.param_groups[-1], lr=float("nan")), ValueError, "lr=nan", None),
    "inf lr": (lambda o, ps: _set(o.param_groups[-1], lr=float("inf")), ValueError, "lr=inf", None),
    "negative lr": (lambda o, ps: _set(o.param_groups[-1], lr=-1e-3), ValueError, "lr=-0.001", None),
    "lr beyond float32": (lambda o, ps: _set(o.param_groups[-1], lr=1e39), ValueError, "learning rate lr = 1e+39",
                          None),
    "lr * weight_decay beyond float32": (lambda o, ps: _set(o.param_groups[-1], lr=1e37, weight_decay=100.0),
                                         ValueError, "lr * weight_decay = 1e+39", None),
    "nan weight_decay": (lambda o, ps: _set(o.param_groups[-1], weight_decay=float("nan")), ValueError,
                         "weight_decay value: nan", None),
    "tensor weight_decay": (lambda o, ps: _set(o.param_groups[-1], weight_decay=torch.tensor(0.1)), TypeError,
                            "weight_decay", None),
    "bad flag": (lambda o, ps: _set(o.param_groups[-1], maximize="yes"), ValueError, "maximize", None),
    "gradient dtype": (lambda o, ps: _grad_data(ps[-1], torch.zeros(2, dtype=torch.float64)), RuntimeError,
                       "gradient of shape (2,), torch.float64", None),
    "gradient shape": (lambda o, ps: _grad_data(ps[-1], torch.zeros(7)), RuntimeError, "gradient of shape (7,)",
                       None),
    "sparse gradient": (lambda o, ps: setattr(ps[-1], "grad", torch.zeros(2).to_sparse()), RuntimeError,
                        "does not support sparse gradients", None),
    "state dtype": (lambda o, ps: _state(o, ps[-1], "exp_avg", torch.zeros(2, dtype=torch.float64)), RuntimeError,
                    "state['exp_avg'] of shape (2,), torch.float64", None),
    "state shape": (lambda o, ps: _state(o, ps[-1], "exp_avg", torch.zeros(3)), RuntimeError,
                    "state['exp_avg'] of shape (3,)", None),
    "state device": (lambda o, ps: _state(o, ps[-1], "exp_avg", torch.zeros(2, device="meta")), RuntimeError,
                     "on meta", None),
    "state not a tensor": (lambda o, ps: _state(o, ps[-1], "exp_avg", 0.0), RuntimeError, "not a tensor", None),
    # (a state of one key is empty without it, which means: create it, as Lion's)
    "state key missing": (lambda o, ps: o.state[ps[-1]].pop("exp_avg"), RuntimeError, "without 'exp_avg'",
                          lambda info: len(info.state_tensor_keys) > 1),
    "step counter": (lambda o, ps: _state(o, ps[-1], "step", torch.zeros(3)), RuntimeError, "state['step']",
                     lambda info: "step" in info.cls.counter_keys),
    "integer parameter": (lambda o, ps: _retype(ps[-1], torch.int64), RuntimeError, "is torch.int64", None),
    "float8 parameter": (lambda o, ps: _retype(ps[-1], torch.float8_e4m3fn), RuntimeError, "is torch.float8_e4m3fn",
                         None),
    "grad_scale of two values": (lambda o, ps: setattr(o, "grad_scale", torch.ones(2)), ValueError,
                                 "Invalid grad_scale", None),
}


def injection(info, name):
    """(inject(opt, last_params), exception, words of the message) of the injection ``name``."""
    if name in info.bad_step_settings:
        settings, exc, words = info.bad_step_settings[name]
        return lambda o, ps: _set(o.param_groups[-1], **settings), exc, words
    inject, exc, words, _ = INJECTIONS[name]
    return inject, exc, words


CASES = [(info, backend, name) for info in TABLE for backend in BACKENDS
         for name in [*(n for n, (*_, applies) in INJECTIONS.items() if applies is None or applies(info)),
                      *info.bad_step_settings]]


@pytest.mark.parametrize(("info", "backend", "name"), CASES, ids=[f"{i.name}-{b}-{n}" for i, b, n in CASES])
def test_a_step_that_raises_changes_nothing(info, backend, name):
    inject, exc, words = injection(info, name)
    opt, last = two_groups(info, backend)
    inject(opt, last)
    snap = snapshot(opt)
    with pytest.raises(exc) as err:
        opt.step()
    assert words in str(err.value), str(err.value)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))  # (the rows with a C loop)
def test_fused_true_that_cannot_compile_raises_before_any_group_changed(info, monkeypatch):
    """The first group runs foreach (AdamW: torch's fused kernel), the last one needs the C
    loop, whose compile fails: under fused=True the step raises with nothing changed."""
    opt, last = two_groups(info, "default", fused=True, **info.c_loop_kwargs)
    opt.param_groups[0].update(**info.no_c_loop_group)

    def no_compiler(kernel):
        raise RuntimeError("no C compiler: 'cc' not found (set CC)")

    monkeypatch.setattr(_fused_cpu, "_libraries", {})
    monkeypatch.setattr(_fused_cpu, "_failed", [])
    monkeypatch.setattr(_fused_cpu, "_warned", [])
    monkeypatch.setattr(_fused_cpu, "_compile", no_compiler)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="fused=True: the fused CPU kernels cannot be compiled here"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))  # (the rows with a C loop)
def test_a_library_that_cannot_be_loaded_warns_once_and_falls_back(info, monkeypatch):
    """A noexec temporary folder makes ctypes.CDLL raise OSError: one warning, then foreach."""
    def refuse(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(_fused_cpu, "_libraries", {})
    monkeypatch.setattr(_fused_cpu, "_failed", [])
    monkeypatch.setattr(_fused_cpu, "_warned", [])
    monkeypatch.setattr(_fused_cpu.ctypes, "CDLL", refuse)
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(100)), None
    q = torch.nn.Parameter(p.detach().clone())
    kw = info.c_loop_kwargs  # (AdamW's default would take torch's kernel)
    a, b = info.cls([p], **kw), info.cls([q], foreach=True, **kw)
    with pytest.warns(RuntimeWarning, match="cannot be compiled here .*cannot be loaded") as caught:
        for _ in range(3):
            p.grad = torch.randn(100)
            q.grad = p.grad.clone()
            a.step()
            b.step()
    assert len([w for w in caught if "cannot be compiled" in str(w.message)]) == 1
    assert torch.equal(p, q)


def _run(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    return done.stdout + done.stderr


CHECK = """
    import warnings, torch
    from optimizer import Lion, _fused_cpu
    p = torch.nn.Parameter(torch.ones(40000)); q = torch.nn.Parameter(torch.ones(40000))
    a, b = Lion([p], lr=0.1), Lion([q], lr=0.1, foreach=False, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.linspace(-1, 1, 40000); q.grad = p.grad.clone()
            a.step(); b.step()
    print("warnings", len([w for w in caught if "cannot be compiled" in str(w.message)]), "equal", torch.equal(p, q),
          "compiled", bool(_fused_cpu._libraries))
"""


def test_cc_is_read_as_a_command_line():
    out = _run(CHECK, CC="cc -Wall")
    assert "warnings 0 equal True compiled True" in out, out


def test_a_compiler_that_writes_nothing_warns_once_and_falls_back():
    out = _run(CHECK, CC="true")  # exits 0 without writing the library
    assert "warnings 1 equal True compiled False" in out, out


def test_build_folders_of_killed_processes_are_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tempfile.gettempdir()
    stale = tempfile.mkdtemp(prefix=f"{_fused_cpu._DIR_PREFIX}{dead.pid}-", dir=tmp)
    alive = tempfile.mkdtemp(prefix=f"{_fused_cpu._DIR_PREFIX}{os.getpid()}-", dir=tmp)
    try:
        _fused_cpu._remove_stale_build_dirs()
        assert not os.path.exists(stale) and os.path.exists(alive)
    finally:
        os.rmdir(alive)


FUNCTIONAL_MISFITS = {
    "a state shorter than its parameter": (lambda p, g, s: (p, g, [s[0][:10]]), "exp_avgs[0]"),
    "a gradient shorter than its parameter": (lambda p, g, s: (p, [g[0][:2]], s), "grads[0]"),
    "a gradient of another dtype": (lambda p, g, s: (p, [g[0].double()], s), "grads[0]"),
    "a state on another device": (lambda p, g, s: (p, g, [torch.zeros(p[0].shape, device="meta")]), "exp_avgs[0]"),
    "a missing state": (lambda p, g, s: (p, g, []), "exp_avgs: 0 tensors"),
    "integer parameters": (lambda p, g, s: ([p[0].long()], [g[0].long()], s), "params[0]"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("misfit", list(FUNCTIONAL_MISFITS))
def test_the_functional_entries_check_their_lists_before_writing(backend, misfit):
    """optimizer.lion.lion / optimizer.adamw.adamw called with lists that do not fit: a
    ValueError naming the list and index, nothing written (the fused kernels walk raw
    memory: a short state would be read and written past its end)."""
    from optimizer.adamw import adamw
    from optimizer.lion import lion

    make, words = FUNCTIONAL_MISFITS[misfit]
    params, grads, states = make([torch.ones(1 << 15)], [torch.full((1 << 15,), 0.5)], [torch.zeros(1 << 15)])
    before = [t.clone() for t in params + grads + states]
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        lion(params, grads, states, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, **BACKENDS[backend])
    for a, b in zip(params + grads + states, before):
        assert a.device.type == "meta" or torch.equal(a, b)
    steps = [torch.zeros(())]
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        adamw(params, grads, states, [torch.zeros(1 << 15)] * len(states), steps * len(params), lr=0.1, beta1=0.9,
              beta2=0.99, eps=1e-8, weight_decay=0.1, **BACKENDS[backend])
    assert steps[0].item() == 0
    for a, b in zip(params + grads + states, before):
        assert a.device.type == "meta" or torch.equal(a, b)
