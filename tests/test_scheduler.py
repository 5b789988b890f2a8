"""Schedules: closed forms written here, independently, at the boundaries; the
LRScheduler contract; the factory; errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from optimizer import AdamW, Lion
from optimizer.scheduler import SCHEDULES, ScheduleLR, WarmupCosineScheduler, get_scheduler, make_schedule

W, T, P, F = 10, 110, 2e-3, 2e-4


def closed_form_warmup_cosine(s):
    if s < W:
        return P * (s + 1) / (W + 1)
    if s >= T:
        return F
    return F + (P - F) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))


def opt_with(lr=P, n_groups=1):
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(n_groups)]
    return AdamW([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(ps)])


BOUNDARIES = [0, 1, W - 1, W, W + 1, (W + T) // 2, T - 1, T, T + 1, 10 * T]


@pytest.mark.parametrize("s", BOUNDARIES)
def test_warmup_cosine_closed_form(s):
    sched = WarmupCosineScheduler(opt_with(), W, T, min_lr_ratio=F / P)
    assert sched.get_lr(s) == pytest.approx(closed_form_warmup_cosine(s), rel=1e-12)
    sched.step(s)  # the call of the Intro2LLM lesson L07: set the rate for step s
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(closed_form_warmup_cosine(s), rel=1e-12)


def test_warmup_cosine_shape():
    sched = WarmupCosineScheduler(None, W, T, peak_lr=P, min_lr=F)
    lrs = [sched.get_lr(s) for s in range(2 * T)]
    assert lrs[0] > 0  # never a zero first step
    assert all(a < b for a, b in zip(lrs[:W], lrs[1 : W + 1]))  # rises strictly during warmup
    assert lrs[W] == pytest.approx(P) and max(lrs) == pytest.approx(P)  # peak at the end of warmup
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1 :]))  # then never rises
    assert lrs[T] == pytest.approx(F) and all(x == pytest.approx(F) for x in lrs[T:])  # floor held


def test_default_floor_is_a_tenth_and_defaults_without_optimizer():
    sched = WarmupCosineScheduler(None, 0, 100)
    assert sched.get_lr(0) == 1.0 and sched.get_lr(100) == pytest.approx(0.1)
    sched.step()
    assert sched.last_epoch == 1 and sched.get_last_lr() == [pytest.approx(sched.get_lr(1))]


def test_step_without_argument_advances_one_and_matches_the_seed_loop():
    a = WarmupCosineScheduler(opt_with(), W, T)
    b = WarmupCosineScheduler(opt_with(), W, T)
    for s in range(T + 5):
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
        a.step()
        b.step(s + 1)


def test_get_lr_is_pure_and_keeps_torchs_meaning_without_step():
    opt = opt_with(n_groups=2)
    sched = WarmupCosineScheduler(opt, W, T)
    for _ in range(3):
        sched.step()
    before = [g["lr"] for g in opt.param_groups]
    assert sched.get_lr(50) == pytest.approx(closed_form_warmup_cosine(50), rel=1e-12)
    assert isinstance(sched.get_lr(50), float) and sched.get_lr(50, group=1) == pytest.approx(2 * sched.get_lr(50))
    assert [g["lr"] for g in opt.param_groups] == before and sched.last_epoch == 3
    assert sched.get_lr() == pytest.approx(before)


def test_per_group_peaks_and_floors():
    opt = opt_with(n_groups=2)
    r = WarmupCosineScheduler(opt, W, T, min_lr_ratio=0.5)
    r.step(T)
    assert r.get_last_lr() == [pytest.approx(0.5 * P), pytest.approx(P)]
    a = WarmupCosineScheduler(opt_with(n_groups=2), W, T, min_lr=1e-5)
    a.step(T)
    assert a.get_last_lr() == [pytest.approx(1e-5), pytest.approx(1e-5)]


def test_is_a_real_lr_scheduler_and_never_patches_step():
    opt = opt_with()
    step_fn = opt.step
    sched = WarmupCosineScheduler(opt, W, T)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert opt.step == step_fn and not hasattr(opt.step, "_wrapped_by_lr_sched")


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_dict_is_plain_and_resumes(name):
    kw = dict(warmup_steps=5, total_steps=60, min_lr_ratio=0.1 if name not in ("constant", "inverse_sqrt") else None)
    opt = opt_with(n_groups=2)
    a = ScheduleLR(opt, name, **kw)
    for _ in range(20):
        a.step()
    saved = roundtrip(a.state_dict())
    b = ScheduleLR(opt_with(n_groups=2), name, **kw)
    b.load_state_dict(saved)
    for _ in range(50):
        a.step()
        b.step()
        assert a.get_last_lr() == b.get_last_lr()


def test_resume_from_last_epoch_after_loading_the_optimizer():
    opt = opt_with()
    a = WarmupCosineScheduler(opt, W, T)
    for _ in range(30):
        a.step()
    opt2 = opt_with()
    opt2.load_state_dict(opt.state_dict())
    b = WarmupCosineScheduler(opt2, W, T, last_epoch=a.last_epoch)
    a.step()
    assert b.get_last_lr() == a.get_last_lr()
    with pytest.raises(KeyError, match="initial_lr"):
        WarmupCosineScheduler(opt_with(), W, T, last_epoch=5)


def test_epoch_stepped_loop_like_minllama():
    """The minllama assignment's loop steps its scheduler once per epoch: total_steps counts epochs then."""
    model = torch.nn.Linear(3, 1)
    opt = Lion(model.parameters(), lr=1e-3)
    sched = WarmupCosineScheduler(opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.0)
    seen = []
    for _epoch in range(10):
        for _batch in range(4):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 3) and seen[2] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == 0.0


def test_tensor_lr_is_filled_in_place():
    lr = torch.tensor(1e-3)
    opt = AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = WarmupCosineScheduler(opt, 0, 10)
    sched.step(10)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-4)


# --- the family, each against a closed form written here -------------------

def hf_free_closed_forms(name, s, w=4, t=40, p=1.0, f=0.1):
    if s < w:
        return p * (s + 1) / (w + 1)
    x = min(1.0, (s - w) / (t - w))
    if name == "constant":
        return p
    if name == "linear":
        return f + (p - f) * (1 - x)
    if name == "cosine":
        return f + (p - f) * (1 + math.cos(math.pi * x)) / 2
    if name == "cosine_with_restarts":  # 2 cycles
        return f if x >= 1 else f + (p - f) * (1 + math.cos(math.pi * ((2 * x) % 1))) / 2
    if name == "polynomial":  # power 2
        return f + (p - f) * (1 - x) ** 2
    if name == "exponential":  # reaches f at t
        return max(f, p * (f / p) ** ((s - w) / (t - w)))
    if name == "inverse_sqrt":
        return p * math.sqrt(w / (s - w + w))
    if name == "warmup_stable_decay":  # last 10 steps, 1-sqrt
        start = t - 10
        return p if s < start else f + (p - f) * (1 - math.sqrt(min(1.0, (s - start) / 10)))
    raise AssertionError(name)


EXTRA = {
    "cosine_with_restarts": dict(num_cycles=2),
    "polynomial": dict(power=2.0),
    "warmup_stable_decay": dict(decay_steps=10),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("s", [0, 3, 4, 5, 13, 22, 30, 35, 39, 40, 41, 400])
def test_family_closed_forms(name, s):
    kw = dict(peak_lr=1.0, warmup_steps=4, total_steps=40, **EXTRA.get(name, {}))
    if name not in ("constant", "inverse_sqrt"):
        kw["min_lr"] = 0.1
    assert make_schedule(name, **kw)(s) == pytest.approx(hf_free_closed_forms(name, s), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_starts_above_zero_and_peaks_at_end_of_warmup(name):
    kw = dict(warmup_steps=7, total_steps=50)
    if name == "exponential":
        kw["min_lr"] = 0.01
    lr = make_schedule(name, **kw)
    assert 0 < lr(0) < lr(6) < lr(7) == 1.0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_warmup_as_long_as_the_run_still_reaches_the_peak(name):
    """warmup_steps == total_steps: the peak at step W (the decay takes one step), as the
    README promises; it used to stop at W / (W + 1) of the peak and drop to the floor."""
    if name == "exponential":
        kw = dict(gamma=0.5, min_lr=0.01)
    elif name in ("constant", "inverse_sqrt"):
        kw = {}
    else:
        kw = dict(min_lr=0.01)
    if name == "warmup_stable_decay":
        kw["decay_steps"] = 0
    lr = make_schedule(name, peak_lr=1.0, warmup_steps=10, total_steps=10, **kw)
    assert lr(9) < lr(10) == 1.0


def test_exponential_decay_at_astronomical_steps_is_its_floor():
    assert make_schedule("exponential", gamma=0.5)(10**400) == 0.0
    assert make_schedule("exponential", gamma=0.5, min_lr=1e-3)(10**400) == 1e-3


def test_wsd_decay_shapes_and_ratio():
    for shape in ("linear", "cosine", "1-sqrt"):
        lr = make_schedule("warmup_stable_decay", warmup_steps=0, total_steps=100, decay_type=shape, min_lr=0.0)
        assert lr(79) == 1.0 and lr(80) == 1.0 and 0 < lr(90) < 1 and lr(100) == 0.0
    lin = make_schedule("warmup_stable_decay", total_steps=100, decay_type="linear")
    assert lin(90) == pytest.approx(0.5)


# --- the factory -------------------------------------------------------------

def test_get_scheduler_with_our_keywords_gives_our_family():
    """warmup_steps / total_steps (our spellings) give our curves (Note [warmup]); Hugging
    Face's and timm's keywords give theirs (tests/test_schedule_conventions.py)."""
    s = get_scheduler("linear", opt_with(lr=1.0), warmup_steps=4, total_steps=40)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler) and s.like == "ours"
    assert s.get_lr(0) == pytest.approx(1 / 5) and s.get_lr(40) == 0.0 and s.get_lr(22) == pytest.approx(0.5)
    s = get_scheduler("cosine_with_min_lr", opt_with(lr=1.0), warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    assert s.get_lr(10) == pytest.approx(0.1)
    s = get_scheduler("wsd", opt_with(lr=1.0), warmup_steps=2, total_steps=10, decay_steps=3, decay_type="linear")
    assert s.get_lr(7) == 1.0 and s.get_lr(10) == 0.0


def test_get_scheduler_accepts_an_enum_name_and_keeps_state_plain():
    import enum

    class SchedulerType(str, enum.Enum):  # how Hugging Face passes names
        COSINE = "cosine"

    s = get_scheduler(SchedulerType.COSINE, opt_with(), num_warmup_steps=1, num_training_steps=10)
    assert s.state_dict()["schedule"] == "cosine" and type(s.state_dict()["schedule"]) is str
    roundtrip(s.state_dict())


def test_get_scheduler_rejects_unknown_names_and_keywords_with_the_valid_list():
    with pytest.raises(ValueError, match=r"Invalid schedule name: 'cosin'; valid names are \[.*'cosine'.*'wsd'"):
        get_scheduler("cosin", opt_with())
    with pytest.raises(ValueError, match=r"Invalid schedule name: 'cosin'; Hugging Face's are \[.*'cosine'"):
        get_scheduler("cosin", opt_with(), num_warmup_steps=1, num_training_steps=10)
    with pytest.raises(ValueError, match=r"Invalid argument 'power' for schedule 'cosine'; it takes"):
        get_scheduler("cosine", opt_with(), total_steps=10, power=2)
    with pytest.raises(ValueError, match=r"Invalid argument 'power' for Hugging Face's 'cosine'; it takes"):
        get_scheduler("cosine", opt_with(), num_warmup_steps=0, num_training_steps=10, power=2)


# --- errors --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(warmup_steps=20, total_steps=10), ("warmup_steps", "20", "total_steps=10")),
        (dict(warmup_steps=-1, total_steps=10), ("warmup_steps", "-1")),
        (dict(warmup_steps=0, total_steps=-5), ("total_steps", "-5")),
        (dict(warmup_steps=0, total_steps=0), ("total_steps", "0")),
        (dict(warmup_steps=1.5, total_steps=10), ("warmup_steps", "1.5")),
        (dict(warmup_steps=0, total_steps=10, min_lr=1.0), ("min_lr", "1.0", "peak")),
        (dict(warmup_steps=0, total_steps=10, min_lr_ratio=1.5), ("min_lr_ratio", "1.5")),
        (dict(warmup_steps=0, total_steps=10, min_lr_ratio=-0.1), ("min_lr_ratio", "-0.1")),
        (dict(warmup_steps=0, total_steps=10, min_lr=1e-5, min_lr_ratio=0.1), ("min_lr", "min_lr_ratio", "both")),
    ],
)
def test_bad_schedule_arguments(kwargs, words):
    with pytest.raises(ValueError) as err:
        WarmupCosineScheduler(opt_with(lr=1e-3), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_negative_step_is_refused():
    sched = WarmupCosineScheduler(None, 1, 10)
    with pytest.raises(ValueError, match="step: -1"):
        sched.get_lr(-1)
    with pytest.raises(ValueError, match="step: -3"):
        sched.step(-3)


def test_bad_state_dict_is_refused_and_nothing_changes():
    sched = WarmupCosineScheduler(opt_with(), W, T)
    before = sched.state_dict()
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({"last_epoch": 3})
    bad = dict(before, warmup_steps=T + 1)
    with pytest.raises(ValueError, match="warmup_steps"):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before


SCHEDULERS = {
    "ours": lambda opt: get_scheduler("cosine", opt, warmup_steps=3, total_steps=20),
    "hf": lambda opt: get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=20),
    "timm": lambda opt: get_scheduler("cosine", opt, t_initial=20, warmup_t=3),
    "WarmupCosineScheduler": lambda opt: WarmupCosineScheduler(opt, 3, 20),
}
BAD_STATES = [
    ({"schedule": "no-such-schedule"}, "schedule name: 'no-such-schedule'"),
    ({"last_epoch": "x"}, "'last_epoch' is 'x'"),
    ({"last_epoch": -5}, "'last_epoch' is -5"),
    ({"last_epoch": math.nan}, "'last_epoch' is nan"),
    ({"base_lrs": [math.inf]}, "'base_lrs' is \\[inf\\]"),
    ({"base_lrs": [1e-3, 1e-3]}, "'base_lrs' has 2 learning rates"),
    ({"_step_count": 1.5}, "'_step_count' is 1.5"),
    ({"options": {"no_such_option": 1}}, "'no_such_option'"),
    ({"options": None}, "'options' is None"),
    ({"step": 3}, "unknown key 'step'"),
]


@pytest.mark.parametrize("bad,message", BAD_STATES, ids=[str(b) for b, _ in BAD_STATES])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_a_bad_state_dict_is_refused_in_one_line_before_anything_changes(kind, bad, message):
    """Every key is checked, and the curves rebuilt, before the scheduler changes: an unknown
    schedule raised KeyError from WarmupCosineScheduler with its schedule already replaced, and a
    last_epoch of 'x', -5 or NaN loaded and broke the next step()."""
    opt, twin_opt = opt_with(), opt_with()
    sched, twin = SCHEDULERS[kind](opt), SCHEDULERS[kind](twin_opt)
    for s in (sched, twin):
        s.step()
        s.step()
    before = sched.state_dict()
    with pytest.raises(ValueError, match=message) as err:
        sched.load_state_dict({**before, **bad})
    assert "\n" not in str(err.value) and str(err.value).startswith(f"Invalid state_dict for {type(sched).__name__}")
    assert sched.state_dict() == before and "step" not in vars(sched)
    for _ in range(5):  # and it goes on as its twin, which saw no bad state_dict
        sched.step()
        twin.step()
        assert sched.get_last_lr() == twin.get_last_lr() and opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name,kwargs,key", [
    ("step", dict(decay_t=0), "decay_t"),                        # timm's t // decay_t
    ("step", dict(decay_t=0.0), "decay_t"),
    ("cosine", dict(t_initial=10, cycle_mul=0), "cycle_mul"),     # timm's log base cycle_mul
    ("cosine", dict(t_initial="10"), "t_initial"),
    ("inverse_sqrt", dict(num_warmup_steps=2, timescale=0), "timescale"),  # Hugging Face's quotient by it
    ("polynomial", dict(num_warmup_steps=2, num_training_steps=10, power=-1), "power"),  # 0 ** power at the end
])
def test_a_schedule_that_would_fail_at_a_later_step_is_refused_at_construction(name, kwargs, key):
    with pytest.raises(ValueError, match=f"Invalid {key}: ") as err:
        get_scheduler(name, opt_with(), **kwargs)
    assert "\n" not in str(err.value)


def test_composes_with_torch_sequential_lr():
    opt = opt_with(lr=1.0)
    warm = ScheduleLR(opt, "constant", warmup_steps=4)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[4])
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        seq.step()
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.25])


def test_integer_like_steps_are_accepted():
    np = pytest.importorskip("numpy")
    sched = WarmupCosineScheduler(None, 2, 10)
    assert sched.get_lr(np.int64(5)) == sched.get_lr(5)
