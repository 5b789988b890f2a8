"""What several test modules share (test modules import from here and from optim_table.py,
never from each other): the backend settings, a tiny model, a training loop, random
hyper-parameters and gradients, snapshots of an optimizer for the promise that a step
that raises changes nothing, and the check that a command-line error is one line, exit 2."""

from __future__ import annotations

import torch
from optim_table import hyper

from optimizer import cli

# the backends a test can ask for, by the keyword arguments that choose them
BACKENDS = {"reference": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
            "default": dict()}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 8),
        torch.nn.Linear(8, 16),
        torch.nn.LayerNorm(16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 11),
    )


def train(model, opt, steps, seed=1, closure=False):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 11, (16,), generator=gen)
        y = (x * 3 + 1) % 11

        def loss_fn():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            losses.append(opt.step(loss_fn).item())
        else:
            losses.append(loss_fn().item())
            opt.step()
    return losses


def draw_config(data, info):
    """Hyper-parameters of ``info``'s row drawn from its ranges (inside a hypothesis test)."""
    from hypothesis import strategies as st

    cfg = {}
    for key, (lo, hi) in info.ranges.items():
        if key.startswith("beta"):
            continue
        cfg[key] = data.draw(st.floats(lo, hi), label=key)
    if "beta1" in info.ranges:
        cfg["betas"] = (data.draw(st.floats(*info.ranges["beta1"]), label="beta1"),
                        data.draw(st.floats(*info.ranges["beta2"]), label="beta2"))
    for key, values in info.choices.items():
        cfg[key] = data.draw(st.sampled_from(values), label=key)
    cfg["maximize"] = data.draw(st.booleans(), label="maximize")
    if "correct_bias" in hyper({}, info):
        cfg["correct_bias"] = data.draw(st.booleans(), label="correct_bias")
    return cfg


def set_grads(params, gen, p_missing=0.2):
    for p in params:
        if torch.rand((), generator=gen).item() < p_missing:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def _copy(v):
    return v.clone() if torch.is_tensor(v) else v


def snapshot(opt):
    """Parameters, gradients and state of ``opt``, copied."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return ([p.detach().clone() for p in params],
            [None if p.grad is None else p.grad.clone() for p in params],
            {id(p): {k: _copy(v) for k, v in s.items()} for p, s in opt.state.items()})


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """The bits of a tensor (so that NaNs compare equal to themselves and -0.0 differs from 0.0)."""
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device
                and a.shape == b.shape and a.layout == b.layout and a.stride() == b.stride()
                if a.layout == torch.strided else True):
            return False
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        return a.device.type == "meta" or torch.equal(_bits(a), _bits(b))
    return a == b


def assert_unchanged(opt, snap):
    """Parameters, gradients and state are bit-identical to ``snap``; no state was created."""
    params, grads, state = snap
    now = [p for g in opt.param_groups for p in g["params"]]
    for p, q, g in zip(now, params, grads):
        assert _same(p.detach(), q)
        assert (p.grad is None) == (g is None) and (g is None or _same(p.grad, g))
    current = {id(p): s for p, s in opt.state.items() if s}
    assert set(current) == {k for k, v in state.items() if v}
    for k, s in current.items():
        assert set(s) == set(state[k])
        for key, v in s.items():
            assert _same(v, state[k][key]), key


def assert_same_nested(a, b, path="state_dict"):
    """Equal structure and values (tensors bit-identical, with dtype and device), as torch's
    assertEqual compares state dicts."""
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))), (path, a, b)
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same_nested(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{path}[{i}]")
    else:
        assert _same(a, b), (path, a, b)


def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 and exactly one line on stderr; return it."""
    assert cli.main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    return lines[0]
