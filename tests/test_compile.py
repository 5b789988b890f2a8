"""torch.compile (Note [torch.compile]): a compiled ``opt.step`` and a compiled training step
that calls it run every backend of both optimizers and give the eager results, while a
scheduler changes the learning rate at every step. The fused paths stay out of the graph;
the reference and foreach paths break the graph no more often than torch.optim.AdamW does,
and nothing recompiles when the learning rate changes. Counted with Dynamo's own counters."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS
from optim_table import TABLE, ids
from torch._dynamo.utils import counters

TRACED = ("reference", "foreach")
STEPS = 6


def run(cls, kwargs, mode):
    """``mode``: "eager", "step" (``torch.compile(opt.step)``) or "train" (a compiled function
    doing forward, backward and ``opt.step()``). Returns the parameters after each step, the
    number of frames Dynamo compiled after each step, and its graph-break count."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)  # a new lr at every step
    xs = torch.randn(STEPS, 5, 8, generator=torch.Generator().manual_seed(1))

    def forward_backward(x):
        opt.zero_grad()
        model(x).square().mean().backward()

    def train_step(x):
        forward_backward(x)
        opt.step()

    step = torch.compile(opt.step) if mode == "step" else opt.step
    train = torch.compile(train_step) if mode == "train" else None
    params, frames = [], []
    for x in xs:
        if train is not None:
            train(x)
        else:
            forward_backward(x)
            step()
        sched.step()
        params.append([p.detach().clone() for p in model.parameters()])
        frames.append(counters["frames"]["total"])
    return params, frames, sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def torch_breaks():
    """Graph breaks of torch.optim.AdamW's for-loop step in each mode, measured here."""
    return {mode: run(torch.optim.AdamW, dict(foreach=False), mode)[2] for mode in ("step", "train")}


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("mode", ["step", "train"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_compiled_steps_equal_eager_ones(info, backend, mode, torch_breaks):
    kwargs = {**BACKENDS[backend], **info.exact_kwargs}
    eager, _, _ = run(info.cls, kwargs, "eager")
    compiled, frames, breaks = run(info.cls, kwargs, mode)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for x, y in zip(a, b):
            if backend in TRACED or mode == "train":  # Inductor's kernels may round differently
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=f"step {step}")
            else:  # the fused kernels run as in eager mode, on eager gradients
                assert torch.equal(y, x), f"step {step}"
    # the scheduler changed lr at every step: after the first steps (state created, lr seen
    # to vary), nothing compiles again
    assert frames[2] == frames[-1], frames
    if backend in TRACED:
        assert breaks <= torch_breaks[mode], (breaks, torch_breaks[mode])


@pytest.mark.parametrize("backend", ["fused", "default"])
@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_fused_steps_stay_out_of_the_graph(info, backend):
    run(info.cls, BACKENDS[backend], "step")
    assert counters["stats"]["calls_captured"] == 0  # no operation of the step was traced


def test_compiled_lion_follows_a_changing_lr():
    """The defect: compiled Lion (reference) with weight decay used a stale lr for the sign
    step once the lr changed (-1.080 instead of -0.830 at the third step)."""
    from optimizer import Lion

    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lion([p], lr=1.0, weight_decay=0.1, foreach=False, fused=False)
    f = torch.compile(opt.step)
    seen = []
    for _ in range(4):
        p.grad = torch.tensor([1.0, -1.0, 0.5])
        f()
        seen.append(p[0].item())
        opt.param_groups[0]["lr"] *= 0.5
    assert seen == pytest.approx([-0.1, -0.595, -0.830125, -0.9447484], rel=1e-6)


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_a_compiled_step_that_fails_creates_no_state(info):
    """Dynamo runs the checks when it traces: every group is checked before the first one
    creates state."""
    torch._dynamo.reset()
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2, 2))  # (every row takes matrices)
    opt = info.cls([{"params": [a]}, {"params": [b]}], foreach=True)
    a.grad, b.grad = torch.ones(3, 2), torch.ones(2, 2)
    opt.state[b] = {k: torch.zeros(5) for k in info.keys_of(b)}  # the last group's state, set by hand, wrong
    opt.state[b].update({k: torch.zeros(()) for k in info.cls.counter_keys})
    with pytest.raises(Exception, match=rf"state\['{info.keys_of(b)[0]}'\] of shape \(5,\)"):
        torch.compile(opt.step)()
    assert not opt.state[a] and torch.equal(a.detach(), torch.ones(3, 2))


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_compiled_steps_under_gradscaler_run_outside_the_graph(info):
    """GradScaler's flag must be read to skip a step: such a step runs whole outside the
    graph, as in eager mode, rather than in fragments; the skipped step changes nothing."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = info.cls(model.parameters(), foreach=True)
        if compiled:
            opt.step = torch.compile(opt.step)  # GradScaler.step calls it with grad_scale and found_inf set
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        xs = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(1))
        for i, x in enumerate(xs):
            opt.zero_grad()
            scaler.scale(model(x).square().sum() * (float("inf") if i == 1 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    assert counters["stats"]["calls_captured"] == 0
    for a, b in zip(*results):
        assert torch.equal(a, b)
