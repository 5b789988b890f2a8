"""Numbers: the reference against the papers' float64 formulas, every backend
against the reference at every step, and AdamW against torch.optim.AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import draw_config, set_grads, tiny_model, train
from hypothesis import given
from hypothesis import strategies as st
from optim_table import TABLE, hyper, ids

shape_st = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)  # 0-dim and empty included
BACKENDS = [(info, name, kw) for info in TABLE for name, kw in info.backends.items()]


def make_params(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@given(data=st.data())
def test_reference_matches_float64_formula(info, data):
    """The reference, run in float64, equals the formula transcribed in optim_table.py."""
    shapes = data.draw(st.lists(shape_st, min_size=1, max_size=4), label="shapes")
    cfg = draw_config(data, info)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    params = make_params(shapes, torch.float64, seed)
    expected = [p.detach().clone() for p in params]
    states = [{k: torch.zeros_like(p) for k in info.keys_of(p)} for p in params]
    steps = [0] * len(params)
    opt = info.cls(params, foreach=False, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    hp = hyper(cfg, info)
    for _ in range(5):
        set_grads(params, gen)
        opt.step()
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            steps[i] += 1
            expected[i], states[i] = info.formula(expected[i], p.grad, states[i], t=steps[i], **hp)
        for p, e, s in zip(params, expected, states):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
            for k in info.keys_of(p):
                if opt.state[p]:
                    torch.testing.assert_close(opt.state[p][k], s[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@given(data=st.data())
def test_bf16_state_is_the_formula_with_the_state_rounded_each_step(info, data):
    """state_dtype=torch.bfloat16 (Note [state precision]): each step is the float64 formula
    applied to the current values, with float32 math, and the state stored rounded to bf16."""
    shapes = data.draw(st.lists(shape_st, min_size=1, max_size=3), label="shapes")
    cfg = draw_config(data, info)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    params = make_params(shapes, torch.float32, seed)
    opt = info.cls(params, foreach=False, fused=False, state_dtype=torch.bfloat16, **cfg, **info.exact_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    hp = hyper(cfg, info)
    steps = [0] * len(params)
    for _ in range(4):
        set_grads(params, gen, p_missing=0.0)
        before = [(p.detach().double(), {k: opt.state[p][k].double() if opt.state[p] else torch.zeros_like(p.double())
                                         for k in info.keys_of(p)}) for p in params]
        opt.step()
        for i, (p, (p0, s0)) in enumerate(zip(params, before)):
            steps[i] += 1
            e, es = info.formula(p0, p.grad.double(), s0, t=steps[i], **hp)
            for k in info.keys_of(p):
                got = opt.state[p][k]
                assert got.dtype == torch.bfloat16
                # float32 math, then one rounding to bf16: within one bf16 ulp (2^-8 relative) of the exact
                # value, plus float32 rounding of the terms summed (2^-22 of their size: when b m and
                # (1 - b) g nearly cancel, that is what is left of the result)
                g = p.grad.double()
                terms = s0[k].abs() + g.abs() + g * g
                err = (got.double() - es[k]).abs()
                assert (err <= 2**-8 * es[k].abs() + 2**-22 * terms).all(), (err.max(), k)
            new, expected = p.detach().double(), e
            if info.near_jump is not None:  # (Lion: sign(c) is exact unless c is within float32 rounding of 0)
                ok = ~info.near_jump(s0, p.grad.double(), rel=1e-6, **hp)
                new, expected = new[ok], expected[ok]
            rtol, atol = info.bf16_state_tol
            torch.testing.assert_close(new, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("info", "backend", "kwargs"), BACKENDS, ids=[f"{i.name}-{b}" for i, b, _ in BACKENDS])
@given(data=st.data())
def test_backend_matches_reference_every_step(info, backend, kwargs, data):
    """Random shapes, dtypes, hyper-parameters, two groups, params without grads."""
    shapes = data.draw(st.lists(shape_st, min_size=1, max_size=6), label="shapes")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]), label="dtype")
    cfg = draw_config(data, info)
    tensor_lr = data.draw(st.booleans(), label="tensor_lr")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    cfg["state_dtype"] = data.draw(st.sampled_from([None, torch.bfloat16, torch.float32]), label="state_dtype")
    ref_params = make_params(shapes, dtype, seed)
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]

    def groups(params):
        half = len(params) // 2
        lr = torch.tensor(cfg["lr"]) if tensor_lr else cfg["lr"]
        second = {"params": params[half:], "lr": cfg["lr"] * 0.5, "weight_decay": 0.0}
        return [{"params": params[:half], "lr": lr}, second] if half else [second]

    rest = {**{k: v for k, v in cfg.items() if k != "lr"}, **info.exact_kwargs}
    ref = info.cls(groups(ref_params), foreach=False, **rest)
    new = info.cls(groups(new_params), **kwargs, **rest)
    gen_ref, gen_new = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        set_grads(ref_params, gen_ref)
        set_grads(new_params, gen_new)
        ref.step()
        new.step()
        tol = {} if info.backend_tol is None else dict(zip(("rtol", "atol"), info.backend_tol))
        for a, b in zip(ref_params, new_params):
            torch.testing.assert_close(b.detach(), a.detach(), **tol)
            assert set(ref.state[a]) == set(new.state[b])
            for k, v in ref.state[a].items():
                torch.testing.assert_close(new.state[b][k], v, **tol)


ADAMW_CONFIGS = [
    dict(),
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3),
    dict(maximize=True, weight_decay=0.0),
]


# each of our backends against torch's corresponding one
BACKEND_PAIRS = [(dict(foreach=False, fused=False), dict(foreach=False)), (dict(foreach=True), dict(foreach=True)),
                 (dict(), dict(fused=True))]


@pytest.mark.parametrize(("ours_kw", "torch_kw"), BACKEND_PAIRS, ids=["loop", "foreach", "default-fused"])
@pytest.mark.parametrize("cfg", ADAMW_CONFIGS)
def test_adamw_matches_torch_adamw(ours_kw, torch_kw, cfg):
    """With correct_bias=True (the default) our AdamW is torch.optim.AdamW, to float32 rounding."""
    from optimizer import AdamW

    ours, theirs = tiny_model(), tiny_model()
    o1 = AdamW(ours.parameters(), **ours_kw, **cfg)
    o2 = torch.optim.AdamW(theirs.parameters(), **torch_kw, **cfg)
    train(ours, o1, 100)
    train(theirs, o2, 100)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(o1.state[a][k], o2.state[b][k], rtol=1e-6, atol=1e-9)


def test_adamw_per_group_settings_match_torch():
    from optimizer import AdamW

    ours, theirs = tiny_model(), tiny_model()

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.0}, {"params": ps[2:], "betas": (0.5, 0.9)}]

    o1, o2 = AdamW(groups(ours)), torch.optim.AdamW(groups(theirs))
    train(ours, o1, 30)
    train(theirs, o2, 30)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_correct_bias_false_is_the_legacy_update():
    """correct_bias=False: no division by (1 - beta^t): the first step moves by lr * g / (|g| + eps)."""
    from optimizer import AdamW

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, -4.0])
    AdamW([p], lr=0.1, correct_bias=False, weight_decay=0.0, eps=0.0).step()
    # m = 0.1 g, v = 0.001 g^2 -> step = lr * 0.1 g / (sqrt(0.001) |g|) = lr * sign(g) * 0.1 / 0.0316
    expected = torch.tensor([1.0, -2.0]) - 0.1 * torch.sign(p.grad) * 0.1 / 0.001**0.5
    torch.testing.assert_close(p.detach(), expected)


def test_lion_matches_lion_pytorch():
    """The peer most Lion users come from (same update, per-tensor)."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    from optimizer import Lion

    ours, theirs = tiny_model(), tiny_model()
    o1 = Lion(ours.parameters(), lr=1e-3, weight_decay=0.1)
    o2 = lion_pytorch.Lion(theirs.parameters(), lr=1e-3, weight_decay=0.1)
    train(ours, o1, 50)
    train(theirs, o2, 50)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lion_sign_of_zero_is_zero():
    from optimizer import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([0.0, 1.0, -1.0])
    Lion([p], lr=0.5).step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 1.5, 3.5]))


def test_lion_with_equal_betas_is_l07s_simplified_form():
    """v = b v + (1 - b) g; theta -= lr sign(v): the special case beta1 == beta2."""
    from optimizer import Lion

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    theta, v = p.detach().clone(), torch.zeros(50)
    opt = Lion([p], lr=1e-2, betas=(0.7, 0.7))
    for _ in range(10):
        g = torch.randn(50)
        p.grad = g.clone()
        opt.step()
        v = 0.7 * v + 0.3 * g
        theta = theta - 1e-2 * torch.sign(v)
    torch.testing.assert_close(p.detach(), theta)


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_params_are_pairs_of_reals(info, foreach):
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    if not info.complex_params:  # refused, naming the dtype
        with pytest.raises(ValueError, match="complex64"):
            info.cls([z], foreach=foreach)
        return
    oz, orr = info.cls([z], foreach=foreach, weight_decay=0.1), info.cls([r], foreach=foreach, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(4, 3, dtype=torch.complex64)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_low_precision_params_keep_float32_state_and_math(info):
    """bf16 params: state in float32; the result is the float32 result rounded once."""
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(64).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float().clone())
    o16, o32 = info.cls([p16], lr=1e-2), info.cls([p32], lr=1e-2)
    g = torch.randn(64).bfloat16()
    p16.grad, p32.grad = g, g.float()
    o16.step()
    o32.step()
    for k in info.keys_of(p16):
        assert o16.state[p16][k].dtype == torch.float32
        torch.testing.assert_close(o16.state[p16][k], o32.state[p32][k], rtol=0, atol=0)
    assert torch.equal(p16.detach(), p32.detach().bfloat16())


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_equals_float_lr(info, foreach):
    a, b = tiny_model(), tiny_model()
    oa = info.cls(a.parameters(), lr=torch.tensor(1e-3), foreach=foreach)
    ob = info.cls(b.parameters(), lr=1e-3, foreach=foreach)
    train(a, oa, 10)
    train(b, ob, 10)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_deepcopy_is_independent_and_continues_identically(info):
    model = tiny_model()
    opt = info.cls(model.parameters(), weight_decay=0.1)
    train(model, opt, 3)
    twin = copy.deepcopy(opt)  # copies the parameters too, as torch's does
    params = [p for g in opt.param_groups for p in g["params"]]  # (in the groups' order, as the copy's)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(params, twin_params):
        assert p is not q and torch.equal(p, q)
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][k]) and v is not twin.state[q][k]


def test_bias_corrections_on_the_device_match_the_formula():
    """The foreach path computes AdamW's bias corrections with tensor ops where the step counts
    live on a GPU (no sync); the same ops on CPU step tensors against the float64 formula."""
    from optimizer.adamw import _device_bias_corrections

    steps = [torch.tensor(float(t)) for t in (1, 2, 10, 1000, 100000)]
    for beta1, beta2 in [(0.9, 0.999), (0.0, 0.5), (0.95, 0.9999)]:
        bc1, bc2_sqrt = _device_bias_corrections(steps, beta1, beta2)
        for s, a, b in zip(steps, bc1, bc2_sqrt):
            t = s.item()
            torch.testing.assert_close(
                a.double(), torch.tensor(1 - beta1**t, dtype=torch.float64), rtol=1e-6, atol=1e-7
            )
            torch.testing.assert_close(b.double(), torch.tensor((1 - beta2**t) ** 0.5, dtype=torch.float64), rtol=1e-6,
                                       atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True)],
                         ids=["reference", "foreach", "fused"])
def test_a_nan_gradient_freezes_a_lion_coordinate_for_good(kwargs):
    """What Lion's docstring warns of (lion-pytorch behaves the same): the momentum of that
    coordinate becomes NaN, sign(NaN) = 0, and the coordinate stops moving; the others go on."""
    from optimizer import Lion

    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([p], lr=0.1, **kwargs)
    p.grad = torch.tensor([float("nan"), 1.0, -1.0])
    opt.step()
    assert torch.isnan(opt.state[p]["exp_avg"][0])
    for _ in range(3):
        p.grad = torch.tensor([1.0, 1.0, -1.0])
        opt.step()
    assert p[0].item() == 0.0 and torch.isnan(opt.state[p]["exp_avg"][0])
    torch.testing.assert_close(p.detach()[1:], torch.tensor([-0.4, 0.4]))


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@pytest.mark.parametrize("kwargs", [dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True), dict()],
                         ids=["reference", "foreach", "fused", "default"])
def test_float64_parameters_with_float32_state(info, kwargs):
    """state_dtype=torch.float32 for float64 parameters: math in float64, state rounded to
    float32 once per step, on every backend as on the reference (foreach mixed the two)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = info.cls([a], lr=1e-2, weight_decay=0.1, state_dtype=torch.float32, **kwargs)
    ob = info.cls([b], lr=1e-2, weight_decay=0.1, state_dtype=torch.float32, foreach=False, fused=False)
    for _ in range(3):
        g = torch.randn(5, 3, dtype=torch.float64)
        a.grad, b.grad = g, g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for k in info.keys_of(a):
        assert oa.state[a][k].dtype == torch.float32
        torch.testing.assert_close(oa.state[a][k], ob.state[b][k])


@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
@pytest.mark.parametrize("kwargs", [dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True)],
                         ids=["reference", "foreach", "fused"])
def test_numpy_scalars_and_one_element_lr_tensors_are_numbers(info, kwargs):
    np = pytest.importorskip("numpy")
    runs = []
    for lr in (1e-2, np.float32(1e-2), torch.tensor([1e-2])):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6))
        opt = info.cls([p], lr=lr, weight_decay=np.float32(0.1), **kwargs)
        for _ in range(3):
            p.grad = torch.linspace(-1, 1, 6)
            opt.step()
        runs.append(p.detach())
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0])
