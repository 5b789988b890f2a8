"""Memory layouts (Note [backends]): the fused kernels walk memory, so they may take a tensor
only if its parameter, gradient and states share one dense layout; everything else must go
where indices are followed. Every backend, with parameter, gradient and state in different
layouts, against the reference on contiguous copies."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import BACKENDS, tiny_model, train
from optim_table import OPTIMIZERS, TABLE, ids

from optimizer import AdamW, _dispatch


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def transposed(t):
    """The same values in the transposed memory order (a non-contiguous leaf, as a parameter
    tied to another's transpose would be)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# name -> (layout of the parameter, layout of its gradient, shape); the state follows the parameter
LAYOUTS = {
    "channels_last param, contiguous grad": (channels_last, lambda t: t.contiguous(), (8, 4, 3, 3)),
    "contiguous param, channels_last grad": (lambda t: t.contiguous(), channels_last, (8, 4, 3, 3)),
    "both channels_last": (channels_last, channels_last, (8, 4, 3, 3)),
    "transposed param, contiguous grad": (transposed, lambda t: t.contiguous(), (6, 5)),
    "both transposed": (transposed, transposed, (6, 5)),
    "transposed param, grad a strided view": (transposed, lambda t: torch.stack([t, t], -1)[..., 0], (6, 5)),
}
# each row with its defaults, and with the settings that take the C loop where the defaults do not
CASES = [(info, backend, layout, cfg) for info in TABLE for backend in BACKENDS for layout in LAYOUTS
         for cfg in ([dict(), info.c_loop_kwargs] if info.c_loop_kwargs else [dict()])]


@pytest.mark.parametrize(("info", "backend", "layout", "cfg"), CASES,
                         ids=[f"{i.name}-{b}-{lay}-{c}" for i, b, lay, c in CASES])
def test_every_backend_with_any_layout_equals_the_reference(info, backend, layout, cfg):
    as_param, as_grad, shape = LAYOUTS[layout]
    torch.manual_seed(0)
    w = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(4)]
    ref_p = torch.nn.Parameter(w.clone())
    new_p = torch.nn.Parameter(as_param(w.clone()))
    assert torch.equal(new_p, ref_p)
    ref = info.cls([ref_p], lr=1e-2, weight_decay=0.1, foreach=False, fused=False, **cfg, **info.exact_kwargs)
    new = info.cls([new_p], lr=1e-2, weight_decay=0.1, **BACKENDS[backend], **cfg, **info.exact_kwargs)
    for g in grads:
        ref_p.grad, new_p.grad = g.clone(), as_grad(g.clone())
        ref.step()
        new.step()
        torch.testing.assert_close(new_p.detach(), ref_p.detach(), rtol=1e-6, atol=1e-7)
        for k, v in ref.state[ref_p].items():
            torch.testing.assert_close(new.state[new_p][k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))  # (the rows with fused kernels)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_fused_kernels_take_a_shared_dense_layout_and_nothing_else(info, layout):
    as_param, as_grad, shape = LAYOUTS[layout]
    p = torch.nn.Parameter(as_param(torch.randn(shape)))
    p.grad = as_grad(torch.randn(shape))
    opt = info.cls([p], fused=True, **info.c_loop_kwargs)
    opt.step()  # creates the state in the parameter's layout
    lists = [[p], [p.grad], *[[opt.state[p][k]] for k in info.cls.state_keys],
             *[[opt.state[p][k]] for k in info.cls.counter_keys]]
    routes = _dispatch.route(info.cls.backends, lists, opt._hyper(opt.param_groups[0]), foreach=None, fused=True)
    shared = p.stride() == p.grad.stride()
    assert routes == ({"c": [0]} if shared else {"foreach": [0]})


def test_adamw_default_with_channels_last_equals_torch():
    """The defect: torch's fused kernel walks raw memory; with a channels_last parameter and a
    contiguous gradient it updated the wrong elements (0.02 away from torch after one step)."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    results = []
    for cls in (torch.optim.AdamW, AdamW):
        p = torch.nn.Parameter(w.clone())
        opt = cls([p], lr=1e-2)
        for _ in range(3):
            p.grad = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_resuming_a_channels_last_run_in_the_default_layout(info):
    """Train a conv model in channels_last, resume it in the default layout: the loaded state
    takes the parameters' layout, and the run ends where the uninterrupted one ends."""
    def conv_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))

    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 3, 9, 9, generator=gen) for _ in range(8)]

    def run(model, opt, xs, fmt):
        for x in xs:
            opt.zero_grad()
            model(x.contiguous(memory_format=fmt)).square().mean().backward()
            opt.step()

    whole = conv_model().to(memory_format=torch.channels_last)
    opt = info.cls(whole.parameters(), lr=1e-2, weight_decay=0.1)
    run(whole, opt, batches[:4], torch.channels_last)
    saved_model, saved_opt = copy.deepcopy(whole.state_dict()), copy.deepcopy(opt.state_dict())
    run(whole, opt, batches[4:], torch.channels_last)

    resumed = conv_model()
    resumed.load_state_dict(saved_model)
    opt2 = info.cls(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        for k in info.keys_of(p):
            assert opt2.state[p][k].stride() == p.stride()
    run(resumed, opt2, batches[4:], torch.contiguous_format)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_model_trained_in_channels_last_learns_as_in_the_default_layout():
    a, b = tiny_model(), tiny_model()
    oa, ob = AdamW(a.parameters()), AdamW(b.parameters())
    for p in a.parameters():  # every parameter transposed in memory where it has two dimensions
        if p.dim() == 2:
            p.data = transposed(p.data)
    train(a, oa, 5)
    train(b, ob, 5)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
