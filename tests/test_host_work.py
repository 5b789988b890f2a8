"""What a step remembers between calls to save host work (Note [fused CPU]: launch plans;
``Optimizer._checked_before``: states checked once) must never hide a change: new gradient
tensors, replaced states, parameters resized with ``.data =``."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, assert_unchanged, snapshot
from optim_table import OPTIMIZERS, ids


def _params(n=5, size=33):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]


def _stepped_twice(info, backend):
    """Parameters and an optimizer after two steps: its states are now "checked before"."""
    params = _params()
    opt = info.cls(params, **BACKENDS[backend])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_new_gradient_tensors_every_step_give_the_reference_result(info, backend):
    """Gradients reallocated each step (zero_grad(set_to_none=True)) reach the kernel: a cached
    plan with stale addresses would read freed memory or the previous gradients."""
    ref_p, new_p = _params(), _params()
    ref = info.cls(ref_p, foreach=False, fused=False)
    new = info.cls(new_p, **BACKENDS[backend])
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in ref_p]
        for a, b, g in zip(ref_p, new_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        new.step()
        for a, b in zip(ref_p, new_p):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_state_replaced_after_some_steps_is_checked_again(info, backend):
    params, opt = _stepped_twice(info, backend)
    key = info.state_tensor_keys[0]
    opt.state[params[-1]][key] = torch.zeros(7)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"state\['" + key + r"'\] of shape \(7,\)"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_a_parameter_resized_in_place_is_caught(info, backend):
    params, opt = _stepped_twice(info, backend)
    params[0].data = torch.zeros(40)  # the same Parameter object, a new shape: its state no longer fits
    params[0].grad = torch.ones(40)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"shape \(40,\)"):
        opt.step()
    assert_unchanged(opt, snap)
