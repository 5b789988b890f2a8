"""The contract torch.optim users rely on, for every row of the table."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from optim_table import OPTIMIZERS, ids
from test_numerics import tiny_model, train

pytestmark = pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))


def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, snap):
    params, state = snap
    for p, q in zip((p for g in opt.param_groups for p in g["params"]), params):
        assert torch.equal(p.detach(), q)
    now = {id(p): s for p, s in opt.state.items() if s}
    assert set(now) == {k for k, v in state.items() if v}
    for k, s in now.items():
        for key, v in s.items():
            assert torch.equal(v, state[k][key])


def test_is_a_torch_optimizer(info):
    assert issubclass(info.cls, torch.optim.Optimizer)


@pytest.mark.parametrize("config", range(5))
def test_loss_goes_down(info, config):
    cfg = dict(info.configs[config % len(info.configs)], lr=info.train_lr)
    cfg.pop("maximize", None)  # maximize is checked against its negation below
    model = tiny_model()
    losses = train(model, info.cls(model.parameters(), **cfg), 60)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_maximize_equals_minimising_the_negation(info):
    a, b = tiny_model(), tiny_model()
    oa, ob = info.cls(a.parameters(), maximize=True), info.cls(b.parameters())
    for pa, pb in zip(a.parameters(), b.parameters()):
        g = torch.randn_like(pa)
        pa.grad, pb.grad = g, -g
    oa.step()
    ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_closure_is_called_and_its_loss_returned(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(torch.arange(4)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_groups_keep_their_own_settings_and_add_param_group(info):
    frozen = torch.nn.Parameter(torch.ones(3))
    moving = torch.nn.Parameter(torch.ones(3))
    late = torch.nn.Parameter(torch.ones(2))
    opt = info.cls([{"params": [frozen], "lr": 0.0}, {"params": [moving]}], weight_decay=0.5)
    opt.add_param_group({"params": [late], "lr": 0.1, "weight_decay": 0.0})
    assert opt.param_groups[2]["betas"] == opt.defaults["betas"]
    for p in (frozen, moving, late):
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(frozen.detach(), torch.ones(3))
    assert not torch.equal(moving.detach(), torch.ones(3))
    assert torch.all(late.detach() < 1)


def test_same_parameter_in_two_groups_is_refused(info):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 .* already appears in parameter group 0"):
        info.cls([{"params": [p]}, {"params": [p]}])
    opt = info.cls([p])
    with pytest.raises(ValueError, match="already appears"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 .* already appears in the same group"):
        info.cls([p, p])


def test_params_without_grad_are_untouched_even_with_state(info):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = info.cls([a, b], weight_decay=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    b_before = b.detach().clone()
    b_state = {k: v.clone() for k, v in opt.state[b].items()}
    b.grad = None
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), b_before)
    for k, v in opt.state[b].items():
        assert torch.equal(v, b_state[k])


def test_a_step_without_any_grad_changes_nothing(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    snap = snapshot(opt)
    opt.step()
    assert_unchanged(opt, snap)
    assert not opt.state


def test_zero_grad_and_hooks(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    model(torch.arange(3)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert seen == ["pre", "post"]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_float_dtype_learns(info, dtype):
    torch.manual_seed(0)
    target = torch.randn(32, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(32, dtype=dtype))
    opt = info.cls([p], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        ((p.double() - target) ** 2).sum().backward()
        opt.step()
    assert p.dtype == dtype
    assert ((p.double() - target) ** 2).sum() < 0.25 * (target**2).sum()


def test_empty_and_zero_dim_tensors_anywhere(info):
    params = [torch.nn.Parameter(torch.randn(())), torch.nn.Parameter(torch.randn(0)),
              torch.nn.Parameter(torch.randn(3, 0, 2)), torch.nn.Parameter(torch.randn(4))]
    for foreach in (False, True):
        opt = info.cls(params, foreach=foreach)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(info, dtype):
    model = tiny_model().to(dtype)
    opt = info.cls(model.parameters(), weight_decay=0.1)
    train(model, opt, 5)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    assert set(saved_opt["state"][0]) == set(opt.state[next(model.parameters())])
    train(model, opt, 5, seed=7)

    resumed = tiny_model(seed=3).to(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = info.cls(resumed.parameters(), weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        for k in info.state_tensor_keys:
            assert opt2.state[p][k].dtype == torch.float32  # Note [state precision] survives the load
    train(resumed, opt2, 5, seed=7)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_follows_the_parameters_device(info):
    """A CPU checkpoint loads onto parameters elsewhere (here the meta device stands in for a GPU)."""
    model = tiny_model()
    opt = info.cls(model.parameters())
    train(model, opt, 2)
    with torch.device("meta"):
        meta_model = tiny_model()
    opt2 = info.cls(meta_model.parameters())
    opt2.load_state_dict(opt.state_dict())
    for p in meta_model.parameters():
        for k in info.state_tensor_keys:
            assert opt2.state[p][k].device.type == "meta"


def test_a_foreign_or_misshapen_checkpoint_is_refused_and_nothing_changes(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    train(model, opt, 2)
    snap = snapshot(opt)

    m2 = tiny_model()
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    train(m2, sgd, 2)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(sgd.state_dict())
    other = next(o for o in OPTIMIZERS if o is not info)
    m3 = tiny_model()
    foreign = other.cls(m3.parameters())
    train(m3, foreign, 2)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(foreign.state_dict())

    bad = copy.deepcopy(opt.state_dict())
    bad["state"][1][info.state_tensor_keys[0]] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=rf"Invalid state\['{info.state_tensor_keys[0]}'\] .*shape \(5, 5\), expected \(16, 8\)"):
        opt.load_state_dict(bad)

    fewer = copy.deepcopy(opt.state_dict())
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match=r"param_groups\[0\] has 6 parameters, this optimizer.s group 0 has 7"):
        opt.load_state_dict(fewer)

    worse = copy.deepcopy(opt.state_dict())
    worse["param_groups"][0]["betas"] = (2.0, 0.9)
    with pytest.raises(ValueError, match="beta parameter at index 0: 2.0"):
        opt.load_state_dict(worse)
    assert_unchanged(opt, snap)


def test_bad_inputs_raise_errors_naming_argument_and_value(info):
    for kwargs, exc, words in info.bad_inputs:
        with pytest.raises(exc) as err:
            info.cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
        for w in words:
            assert w in str(err.value), (kwargs, str(err.value))


def test_bad_params_raise_clear_errors(info):
    with pytest.raises(ValueError, match="empty"):
        info.cls([])
    with pytest.raises(TypeError, match="iterable"):
        info.cls(42)
    with pytest.raises(TypeError, match=r"single Tensor of shape \(2,\)"):
        info.cls(torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(ValueError, match="group 1 has no parameters"):
        info.cls([{"params": [torch.nn.Parameter(torch.ones(1))]}, {"params": []}])


def test_bad_hyperparameter_set_later_fails_the_step_before_any_change(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    train(model, opt, 2)
    opt.param_groups[-1]["lr"] = -1.0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="lr=-1.0"):
        opt.step()
    assert_unchanged(opt, snap)


def test_sparse_gradient_is_refused_before_any_change(info):
    dense = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = info.cls([dense, *emb.parameters()])
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients .*parameter 1 of group 0.*SparseAdam"):
        opt.step()
    assert_unchanged(opt, snap)


def test_grad_scaler_unscales_and_skips_infs(info):
    a, b = tiny_model(), tiny_model()
    oa, ob = info.cls(a.parameters()), info.cls(b.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.arange(5)
    scaler.scale(a(x).sum()).backward()
    scaler.step(oa)
    scaler.update()
    b(x).sum().backward()
    ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    snap = snapshot(oa)
    oa.zero_grad()
    scaler.scale(a(x).sum() * float("inf")).backward()
    scaler.step(oa)
    scaler.update()
    assert_unchanged(oa, snap)
    assert scaler.get_scale() < 2.0**10


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_torch_lr_schedulers_drive_it(info):
    model = tiny_model()
    opt = info.cls(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    for _ in range(10):
        train(model, opt, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    opt_t = info.cls(tiny_model().parameters(), lr=torch.tensor(1e-3))
    torch.optim.lr_scheduler.StepLR(opt_t, step_size=1, gamma=0.5).step()
    assert opt_t.param_groups[0]["lr"].item() == pytest.approx(5e-4)


@pytest.mark.parametrize("backend", [dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True)],
                         ids=["reference", "foreach", "fused"])
def test_gradscaler_unscales_and_skips_inf_steps(info, backend):
    """torch.amp.GradScaler hands our step grad_scale and found_inf (Note [GradScaler]): scaled
    training equals unscaled training in which the step with an inf gradient never happened."""
    scaled, plain = tiny_model(), tiny_model()
    opt = info.cls(scaled.parameters(), lr=info.train_lr, **backend)
    ref = info.cls(plain.parameters(), lr=info.train_lr, foreach=False, fused=False)
    assert info.cls._step_supports_amp_scaling  # so GradScaler leaves unscaling and skipping to us
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x = torch.randint(0, 11, (16,), generator=gen)
        y = (x * 3 + 1) % 11
        scaler.scale(torch.nn.functional.cross_entropy(scaled(x), y)).backward()
        if step == 2:
            next(scaled.parameters()).grad[0, 0] = float("inf")
        before = snapshot(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            assert_unchanged(opt, before)
            assert scaler.get_scale() == 2.0**9
            continue
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        ref.step()
        ref.zero_grad()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
