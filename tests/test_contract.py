"""The contract torch.optim users rely on, for every row of the table."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from helpers import BACKENDS, assert_same_nested, assert_unchanged, snapshot, tiny_model, train
from optim_table import TABLE, ids

pytestmark = pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))


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
    frozen = torch.nn.Parameter(torch.ones(3, 2))  # (matrices: every row's algorithm takes them)
    moving = torch.nn.Parameter(torch.ones(3, 2))
    late = torch.nn.Parameter(torch.ones(2, 2))
    opt = info.cls([{"params": [frozen], "lr": 0.0}, {"params": [moving]}], weight_decay=0.5)
    opt.add_param_group({"params": [late], "lr": 0.1, "weight_decay": 0.0})
    key = info.checked_key[0]
    assert opt.param_groups[2][key] == opt.defaults[key]
    for p in (frozen, moving, late):
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(frozen.detach(), torch.ones(3, 2))
    assert not torch.equal(moving.detach(), torch.ones(3, 2))
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
    assert set(saved_opt["state"][0]) == set(opt.state[opt.param_groups[0]["params"][0]])
    train(model, opt, 5, seed=7)

    resumed = tiny_model(seed=3).to(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = info.cls(resumed.parameters(), weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        for k in info.keys_of(p):
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
        for k in info.keys_of(p):
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
    other = next(o for o in TABLE if o is not info)
    m3 = tiny_model()
    foreign = other.cls(m3.parameters())
    train(m3, foreign, 2)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(foreign.state_dict())

    bad = copy.deepcopy(opt.state_dict())
    weight = model[1].weight  # (16, 8): its index in the checkpoint, and its state's first key
    index = next(i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is weight)
    key = info.keys_of(weight)[0]
    bad["state"][index][key] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=rf"Invalid state\['{key}'\] .*shape \(5, 5\), expected \(16, 8\)"):
        opt.load_state_dict(bad)

    fewer = copy.deepcopy(opt.state_dict())
    n = len(fewer["param_groups"][0]["params"])
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    expected = rf"param_groups\[0\] has {n - 1} parameters, this optimizer.s group 0 has {n}"
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(fewer)

    worse = copy.deepcopy(opt.state_dict())
    key, _, value, words = info.checked_key
    worse["param_groups"][-1][key] = value
    with pytest.raises(ValueError, match=words):
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


def test_errors_torch_optim_also_raises_carry_its_words(info):
    """Where torch.optim refuses the same input with the same exception, our message holds its
    words (what torch's own test_errors searches for) besides naming the argument and value."""
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable of Tensors or"):
        info.cls(p)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        info.cls([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        info.cls([p], lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        info.cls([p], weight_decay=-1)


OTHER_LIBRARIES_OPTIONS = {  # the options of the optimizer each of ours replaces that ours does not have
    "AdamW": ("amsgrad", "capturable", "differentiable"),  # torch.optim.AdamW's
    "Lion": ("decoupled_weight_decay",),                   # lion-pytorch's (its use_triton: a choice of backend)
    "Muon": (),                                            # torch.optim.Muon's: none
}
PEER_SIGNATURES = {  # the peer's constructor: (its keywords, how many of them come first in ours, in order)
    "AdamW": (lambda: inspect.signature(torch.optim.AdamW.__init__).parameters, 6),  # 7th: torch's amsgrad,
    # ours the course's correct_bias (the CMU minllama assignment's positional call)
    "Lion": (lambda: ("self", "params", "lr", "betas", "weight_decay", "use_triton", "decoupled_weight_decay"), 7),
    # (lion-pytorch 0.2's, written out: not a test dependency)
    "Muon": (lambda: inspect.signature(torch.optim.Muon.__init__).parameters, 10),
}


def test_every_keyword_of_the_optimizer_ours_replaces_is_accepted_in_its_place(info):
    """Drop-in: each keyword of torch.optim.AdamW, lion-pytorch's Lion and torch.optim.Muon is one
    of ours (an option ours lacks is in OTHER_LIBRARIES_OPTIONS: accepted at its default), and a
    positional call written for the peer means the same with ours (but for AdamW's 6th argument)."""
    import optimizer

    cls = next(c.__name__ for c in info.cls.__mro__ if c.__name__ in PEER_SIGNATURES)
    ours = list(inspect.signature(getattr(optimizer, cls).__init__).parameters)
    theirs, in_order = PEER_SIGNATURES[cls]
    theirs = list(theirs())
    assert [name for name in theirs if name not in ours] == []
    assert ours[:in_order] == theirs[:in_order]


def test_other_libraries_options_run_at_their_defaults_and_true_is_refused(info):
    """Code written for torch.optim.AdamW or lion-pytorch's Lion that spells out an option we do
    not have, at its default, runs unchanged (and steps as without it); True, which would ask for
    what we do not do, is a one-line error naming it, before anything is built."""
    import optimizer

    cls = next(c.__name__ for c in info.cls.__mro__ if c.__name__ in OTHER_LIBRARIES_OPTIONS)
    if not OTHER_LIBRARIES_OPTIONS[cls]:
        pytest.skip(f"{cls}'s peer has no option ours lacks")
    make = getattr(optimizer, cls)
    for option in OTHER_LIBRARIES_OPTIONS[cls]:
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        plain, spelled = make([a], weight_decay=0.1), make([b], weight_decay=0.1, **{option: False})
        for p, opt in ((a, plain), (b, spelled)):
            p.grad = torch.full((3,), 0.5)
            opt.step()
        assert torch.equal(a, b)
        assert option not in spelled.state_dict()["param_groups"][0]
        with pytest.raises(ValueError, match=f"Invalid {option}: True; .+") as err:
            make([a], **{option: True})
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=f"Invalid {option}: 'yes'"):
            make([a], **{option: "yes"})
    if cls == "Lion":  # lion-pytorch's choice of backend: either value runs (ours picks Triton on CUDA itself)
        optimizer.Lion([torch.nn.Parameter(torch.ones(3))], 1e-4, (0.9, 0.99), 0.0, True)
    if cls == "AdamW":  # the same keywords reach SparseAdamW through create_optimizer (sparse embeddings)
        from optimizer.factory import create_optimizer

        model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
        create_optimizer(model, "adamw", amsgrad=False, capturable=False, differentiable=False)
        with pytest.raises(ValueError, match="Invalid amsgrad: True; "):
            optimizer.SparseAdamW(model[0].parameters(), amsgrad=True)


def test_an_empty_group_is_kept_as_torch_optim_keeps_it(info):
    """torch.optim accepts a group without parameters (ZeroRedundancyOptimizer gives each rank a
    copy of every group, empty where its share of the group is): it steps and checkpoints as one."""
    model = tiny_model()
    opt = info.cls([{"params": list(model.parameters())}, {"params": []}])
    opt.add_param_group({"params": [], "lr": 0.5})
    train(model, opt, 2)
    saved = opt.state_dict()
    assert [g["params"] for g in saved["param_groups"][-2:]] == [[], []] and saved["param_groups"][-1]["lr"] == 0.5
    twin = info.cls([{"params": list(tiny_model().parameters())}, {"params": []}])
    twin.add_param_group({"params": [], "lr": 0.5})
    twin.load_state_dict(saved)
    assert_same_nested(twin.state_dict(), saved)


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
    gi, i = next((gi, i) for gi, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])
                 if p is emb.weight)  # (1 and 0 where the parameters stay in one group)
    with pytest.raises(RuntimeError,
                       match=rf"does not support sparse gradients .*parameter {i} of group {gi}.*SparseAdam"):
        opt.step()
    assert_unchanged(opt, snap)


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


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gradscaler_unscales_and_skips_inf_steps(info, backend):
    """torch.amp.GradScaler hands our step grad_scale and found_inf (Note [GradScaler]): scaled
    training equals unscaled training in which the steps with an inf gradient never happened,
    whether one element (step 2) or the whole loss (step 3) overflowed; such a step changes
    nothing and halves the scale."""
    scaled, plain = tiny_model(), tiny_model()
    opt = info.cls(scaled.parameters(), lr=info.train_lr, **BACKENDS[backend], **info.exact_kwargs)
    ref = info.cls(plain.parameters(), lr=info.train_lr, foreach=False, fused=False, **info.exact_kwargs)
    assert info.cls._step_supports_amp_scaling  # so GradScaler leaves unscaling and skipping to us
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    gen = torch.Generator().manual_seed(0)
    skipped = (2, 3)
    for step in range(6):
        x = torch.randint(0, 11, (16,), generator=gen)
        y = (x * 3 + 1) % 11
        loss = torch.nn.functional.cross_entropy(scaled(x), y)
        scaler.scale(loss * float("inf") if step == 3 else loss).backward()
        if step == 2:
            next(scaled.parameters()).grad[0, 0] = float("inf")
        before = snapshot(opt)
        scaler.step(opt)
        if step in skipped:
            assert_unchanged(opt, before)
        scaler.update()
        opt.zero_grad()
        if step in skipped:
            assert scaler.get_scale() == 2.0 ** (11 - step)  # 2^9, then 2^8
            continue
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        ref.step()
        ref.zero_grad()
        if step == 0:  # one scaled step is the unscaled step
            for a, b in zip(scaled.parameters(), plain.parameters()):
                torch.testing.assert_close(a, b)
    assert scaler.get_scale() < 2.0**10
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# the rest of the contract pytorch's generic optimizer suite (TestOptimRenewed) checks
# ---------------------------------------------------------------------------

BACKEND_KWARGS, BACKEND_IDS = list(BACKENDS.values()), list(BACKENDS)


def test_hyperparameters_are_checked_before_params(info):
    """As torch.optim: a bad hyper-parameter is named even when params are bad too."""
    key, _, value, words = info.checked_key
    with pytest.raises(ValueError, match=words):
        info.cls(None, **{key: value})


@pytest.mark.parametrize("kwargs", BACKEND_KWARGS, ids=BACKEND_IDS)
def test_save_load_save_is_the_identity(info, kwargs):
    """A loaded optimizer's state_dict() is the one it was loaded from (torch adds keys such as
    'differentiable' on load; none may appear), through torch.save/load with weights_only."""
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    a = info.cls([p], **kwargs)
    a.step()
    saved = a.state_dict()
    b = info.cls([torch.nn.Parameter(p.detach().clone())], **kwargs)
    b.load_state_dict(roundtrip(saved))
    assert_same_nested(b.state_dict(), saved)
    assert_same_nested(roundtrip(b.state_dict()), saved)
    assert b.defaults == a.defaults


@pytest.mark.parametrize("kwargs", BACKEND_KWARGS, ids=BACKEND_IDS)
def test_state_dict_is_deterministic(info, kwargs):
    """A twin loaded from a state_dict runs in lockstep, and the state_dicts stay equal (also
    with a repeated group, whose parameters keep their indices)."""
    model, twin = tiny_model(), tiny_model()
    opt = info.cls(model.parameters(), weight_decay=0.1, **kwargs)
    train(model, opt, 4)
    twin.load_state_dict(model.state_dict())
    opt2 = info.cls(twin.parameters(), weight_decay=0.1, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 4, seed=5)
    train(twin, opt2, 4, seed=5)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert_same_nested(opt.state_dict(), opt2.state_dict())
    opt2.param_groups.extend(opt2.param_groups)
    assert_same_nested(opt.state_dict()["param_groups"][-1], opt2.state_dict()["param_groups"][-1])


def test_older_state_dicts_load(info):
    """Options a checkpoint may predate are filled from the defaults; a step count saved as a
    number becomes our float32 tensor; training continues as the uninterrupted run."""
    model, twin = tiny_model(), tiny_model()
    opt = info.cls(model.parameters(), weight_decay=0.1)
    train(model, opt, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("maximize", "foreach", "fused", "state_dtype", "correct_bias"):
            group.pop(flag, None)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = int(state["step"].item())
    twin.load_state_dict(model.state_dict())
    opt2 = info.cls(twin.parameters(), weight_decay=0.1)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["maximize"] is False and opt2.param_groups[0]["state_dtype"] is None
    for p in twin.parameters():
        if "step" in opt2.state[p]:
            assert opt2.state[p]["step"].dtype == torch.float32 and opt2.state[p]["step"].dim() == 0
    train(model, opt, 3, seed=9)
    train(twin, opt2, 3, seed=9)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("named", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["named-named", "named-unnamed", "unnamed-named", "unnamed-unnamed"])
def test_named_parameters_load_both_ways(info, named):
    model = tiny_model()
    opt = info.cls(model.named_parameters() if named[0] else model.parameters())
    train(model, opt, 2)
    opt2 = info.cls(model.named_parameters() if named[1] else model.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt2, 1)
    names = [n for n, _ in model.named_parameters()]
    groups = opt2.state_dict()["param_groups"]
    if any(named):
        saved = [n for g in groups for n in g["param_names"]]  # (in the groups' order)
        params = dict(model.named_parameters())
        assert sorted(saved) == sorted(names)
        assert all(params[n] is p for n, p in zip(saved, (p for g in opt2.param_groups for p in g["params"])))
    else:
        assert all("param_names" not in g for g in groups)


def test_named_and_unnamed_parameters_do_not_mix(info):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="with/without names"):
        info.cls([("a", a), b])
    with pytest.raises(ValueError, match="with/without names"):
        info.cls([{"params": [a]}, {"params": [("b", b)]}])


def test_state_dict_and_load_state_dict_hooks(info):
    model = tiny_model()
    opt = info.cls(model.parameters(), lr=1e-3)
    train(model, opt, 1)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("note", 1))

    def post(o, sd):
        sd["seen_note"] = sd["state"].pop("note", None) == 1
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["seen_note"] and "note" not in sd["state"]
    del opt.state["note"]

    # load pre-hooks run first, in order (prepend first), and may return a new dict
    calls = []

    def set_lr(o, sd):
        calls.append("set_lr")
        sd["param_groups"][0]["lr"] = 0.002

    def copy_with_lr(o, sd):
        calls.append("copy")
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 0.003
        return new

    opt.register_load_state_dict_pre_hook(set_lr)
    opt.register_load_state_dict_pre_hook(copy_with_lr, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o.param_groups[0]["lr"])))
    opt.load_state_dict(sd)
    assert calls == ["copy", "set_lr", ("post", 0.002)]
    assert opt.param_groups[0]["lr"] == 0.002


def test_load_checks_the_dict_its_pre_hooks_made(info):
    """Our checks see the checkpoint after the pre-hooks: a hook may repair a checkpoint, and a
    checkpoint a hook breaks is refused with nothing changed."""
    model = tiny_model()
    opt = info.cls(model.parameters())
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    key, good, _, _ = info.checked_key
    del sd["param_groups"][-1][key]
    with pytest.raises(ValueError, match=rf"lacks \['{key}'\]"):
        opt.load_state_dict(sd)
    handle = opt.register_load_state_dict_pre_hook(lambda o, d: d["param_groups"][-1].update({key: good}))
    opt.load_state_dict(sd)
    assert opt.param_groups[-1][key] == good
    handle.remove()
    snap = snapshot(opt)
    opt.register_load_state_dict_pre_hook(lambda o, d: d["param_groups"][0].__setitem__("lr", -1.0))
    with pytest.raises(ValueError, match="lr=-1.0"):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_unchanged(opt, snap)
    assert opt.param_groups[0]["lr"] != -1.0


def test_it_prints_like_torch_optimizers(info):
    opt = info.cls([torch.nn.Parameter(torch.ones(2))], lr=0.5)
    text = repr(opt)
    assert text.startswith(f"{info.cls.__name__} (") and "Parameter Group 0" in text and "lr: 0.5" in text


@pytest.mark.parametrize("kwargs", BACKEND_KWARGS, ids=BACKEND_IDS)
def test_zero_gradients_without_weight_decay_change_no_parameter(info, kwargs):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(()))]
    before = [p.detach().clone() for p in params]
    opt = info.cls(params, weight_decay=0.0, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
    assert all(len(opt.state[p]) > 0 for p in params)


def test_fused_true_on_meta_parameters_raises_before_anything_changes(info):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = info.cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors.*meta"):
        opt.step()
    assert_unchanged(opt, snap)
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")  # new parameters: the optimizer's meta ones have no gradient now
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()
    assert not opt.state


@pytest.mark.parametrize("kwargs", BACKEND_KWARGS, ids=BACKEND_IDS)
def test_float64_as_the_default_dtype(info, kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a, b = tiny_model(), tiny_model()
        oa = info.cls(a.parameters(), weight_decay=0.1, **kwargs)
        ob = info.cls(b.parameters(), weight_decay=0.1, foreach=False, fused=False)
        train(a, oa, 3)
        train(b, ob, 3)
    finally:
        torch.set_default_dtype(previous)
    for x, y in zip(a.parameters(), b.parameters()):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_deepcopy_copies_every_public_attribute(info):
    model = tiny_model()
    opt = info.cls(model.parameters())
    train(model, opt, 2)
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    assert public(copy.deepcopy(opt)) == public(opt)


def test_global_step_hooks_run(info):
    seen = []
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    pre = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o))))
    post = register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o))))
    try:
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        info.cls([p]).step()
    finally:
        pre.remove()
        post.remove()
    assert seen == [("pre", info.cls), ("post", info.cls)]


def test_a_torch_adam_checkpoint_with_l2_decay_is_refused(info):
    """torch.optim.Adam's weight decay is an L2 penalty (decoupled_weight_decay=False): loading
    it as decoupled decay would change the experiment silently."""
    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([p], weight_decay=0.1)
    p.grad = torch.ones(3)
    adam.step()
    opt = info.cls([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        opt.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("kwargs", BACKEND_KWARGS, ids=BACKEND_IDS)
def test_gradscaler_values_of_one_element_any_shape(info, kwargs):
    """GradScaler's grad_scale / found_inf may be (1,)-shaped (torch's own fused kernels take
    them so): a 0-dim parameter after a larger one is updated as with 0-dim ones."""
    runs = []
    for shape in ((), (1,)):
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(()))]
        opt = info.cls(params, **kwargs)
        for p in params:
            p.grad = torch.full_like(p, 4.0)
        opt.grad_scale, opt.found_inf = torch.full(shape, 2.0), torch.zeros(shape)
        opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b) and a.shape == b.shape
